"""Duration-aware gradient weighting: each sample's advantages × its action's duration over the batch mean.

Why ("RL for ML-engineering agents", duration-aware gradient updates): when the policy's choice decides how the
rollout workers' *time* is shared among actions (a worker keeps executing what it drew until the next update) and the
trainer takes the samples that finish first, an action a reaches the trainer at a rate ∝ π(a)/d(a), not ∝ π(a). The
updates then favour fast actions; without a baseline (or with a fixed one, on positive rewards) a fast, worse action
can win over a slow, better one. Weighting each sample by w_i = d_i / mean(d) gives each action a weight ∝ π(a) again.

What this does not cover. Where every action the policy starts is trained (synchronous steps; rollflow's store, which
waits for slow groups rather than drop them), each action already makes up its share π(a) of the samples whatever its
duration (a worker finishes one sample per action it starts): the weights then tilt updates toward slow actions,
∝ π(a)·d(a). Where samples are lost by how long they run (abandoned in flight at an update, dropped when stale), fast
actions are favoured too, but not ∝ 1/d, so these weights are not the matching correction. A batch that closes before a slow
action can finish holds none of it, and no weight brings it back. See ``tests/algos/test_duration.py``.
"""

from __future__ import annotations

import torch

from rollflow.api import SampleRow
from rollflow.api.trajectory import ENV

EPS = 1e-6  # seconds: the least a duration counts as, so that no weight is exactly 0 and mean(d) > 0


def duration_weights(durations: torch.Tensor) -> torch.Tensor:
    """w_i = d_i / mean(d), so the weights average to 1. ``durations`` (B,) seconds → (B,).

    A duration ≤ 0 (not measured, or a clock step backwards) counts as ``EPS``; if none is positive, every weight is
    1 (nothing to tell the samples apart by).
    """
    d = durations if durations.is_floating_point() else durations.to(torch.get_default_dtype())  # (B,)
    if not bool((d > 0).any()):
        return torch.ones_like(d)
    d = d.clamp(min=EPS)
    return d / d.mean()


def action_duration(row: SampleRow) -> float:
    """Seconds the environment spent executing the agent's actions in ``row`` (a row of ``TextPolicyStep``: its
    ``trajectory`` a ``Trajectory``, its ``reward`` a ``RewardCell``): the durations of the trajectory's environment
    turns plus the reward cell's (a reward stage that runs the agent's program executes its action);
    ``row.duration`` (start of production to last column) when both are 0, and 0 if the row has no timestamps.
    Time spent generating (model turns) and resetting the environment (the prompt turn) is not the action's.
    """
    acted = sum(t.duration for t in row["trajectory"].turns if t.source == ENV) + row["reward"].duration
    if acted > 0:
        return acted
    return row.duration if {"started", "finished"} <= row.timestamps.keys() else 0.0
