"""Duration-aware weighting: the weights and a row's action duration by hand, ``TextPolicyStep`` scaling each row's
advantages by them, and the bias they remove, in a simulated two-action environment on a virtual clock."""

import heapq
import random

import pytest
import torch

from rollflow.algos import ADVANTAGES, action_duration, duration_weights, policy_loss_fn
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import RewardCell, RewardResult, SampleRow, Status, TrainBatch, Trajectory, Turn
from rollflow.config import load_config
from rollflow.recipes.grpo import build_algorithm


def test_weights_by_hand():
    assert duration_weights(torch.tensor([1.0, 2.0, 3.0])).tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert duration_weights(torch.tensor([4, 4])).tolist() == [1.0, 1.0]  # integer seconds are fine
    w = duration_weights(torch.tensor([7.0, 1.0, 2.5, 0.5]))
    assert w.shape == (4,) and w.mean().item() == pytest.approx(1.0)


def test_unmeasured_durations_weigh_almost_nothing_and_all_unmeasured_weigh_one():
    # 0 and -1 count as 1e-6 s: mean(d) = (2 + 2e-6) / 3
    assert duration_weights(torch.tensor([0.0, 2.0, -1.0])).tolist() == pytest.approx([0.0, 3.0, 0.0], abs=1e-5)
    assert duration_weights(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert duration_weights(torch.tensor([-2.0, 0.0])).tolist() == [1.0, 1.0]
    assert duration_weights(torch.zeros(0)).shape == (0,)


def trajectory(env_spans, response=(7, 8)):
    """Prompt [1, 2] (reset: 0 → 1 s), then per env span a model turn of ``response`` and an observation [9]."""
    tokens, mask, turns, now = [1, 2], [0, 0], [Turn(0, 2, "prompt", 0.0, 1.0)], 1.0
    for seconds in env_spans:
        turns.append(Turn(len(tokens), len(tokens) + len(response), "model", now, now + 0.5))
        tokens, mask, now = tokens + list(response), mask + [1] * len(response), now + 0.5
        turns.append(Turn(len(tokens), len(tokens) + 1, "env", now, now + seconds))
        tokens, mask, now = tokens + [9], mask + [0], now + seconds
    return Trajectory(tokens, mask, [-0.5 * m for m in mask], [0 if m else -1 for m in mask], turns, "")


def row(uid, env_spans, reward=0.0, scored_in=0.0, status=Status.OK, timestamps=None):
    cells = {"trajectory": trajectory(env_spans), "reward": RewardCell(RewardResult(reward, status=status), scored_in)}
    return SampleRow(uid, 0, cells, timestamps or {})


def test_action_duration_by_hand():
    # env turns 2.5 + 0.25 s, reward stage 1.5 s; the prompt turn (reset) and the model turns do not count
    assert action_duration(row(0, [2.5, 0.25], scored_in=1.5)) == pytest.approx(4.25)
    assert action_duration(row(1, [], scored_in=3.0)) == 3.0  # single turn: the time the program ran when scored
    # nothing measured: start of production to the last column; no timestamps either: 0
    assert action_duration(row(2, [0.0], timestamps={"started": 10.0, "finished": 17.0})) == 7.0
    assert action_duration(row(3, [])) == 0.0


class Recording:
    """The engine's side of a step: keeps the advantages it is asked to train on."""

    version = 0

    def __init__(self) -> None:
        self.advantages = None

    def train_step(self, batch, loss_fn, minibatches=1, epochs=1, lr_scale=1.0):
        self.advantages = batch.advantages.clone()
        return {}


def step_advantages(weighting: bool) -> tuple[torch.Tensor, dict[str, float]]:
    # env seconds 1, 2, 3, 6 (mean 3); the fifth row failed on infrastructure after 100 s: masked, not in the mean
    group = [row(0, [1.0], 0.0), row(1, [0.5], 1.0, scored_in=1.5), row(2, [3.0], 0.0), row(3, [2.0, 4.0], 1.0),
             row(4, [100.0], 5.0, status=Status.INFRA_ERROR)]
    algo = Algorithm(ADVANTAGES.get("grpo"), policy_loss_fn("ppo_clip", "token-mean"), duration_weighting=weighting)
    engine = Recording()
    metrics = TextPolicyStep(algo, pad_id=0)([group], engine, None)
    return engine.advantages, metrics


def test_the_config_flag_reaches_the_algorithm_and_is_off_by_default():
    assert build_algorithm(load_config(overrides=["algo.duration_weighting=true"])).duration_weighting
    assert not build_algorithm(load_config()).duration_weighting


def test_text_policy_step_scales_each_rows_advantages_by_its_duration_weight():
    plain, plain_metrics = step_advantages(False)
    weighted, metrics = step_advantages(True)
    weights = torch.tensor([1 / 3, 2 / 3, 1.0, 2.0, 1.0])  # (B,) d / 3; the masked row keeps 1
    assert plain.abs().sum() > 0 and (plain[4] == 0).all()
    torch.testing.assert_close(weighted, plain * weights[:, None])
    assert metrics["train/duration_weight_max"] == pytest.approx(2.0)
    assert "train/duration_weight_max" not in plain_metrics


# A two-action environment: the fast action is worse. Rewards are positive and REINFORCE has no baseline, so an
# action's expected gradient is f(a)·r(a) − π(a)·Σ_b f(b)·r(b), with f the share of the batch it makes up: with
# f ∝ π the slow action gains (π_fast·π_slow·(r_fast − r_slow) < 0 for the fast logit); with f ∝ π/d the fast one does
# (π_fast·π_slow·(r_fast/d_fast − r_slow/d_slow) > 0). A batch-mean baseline would keep every sign right.
FAST, SLOW = 0, 1
DURATION = torch.tensor([1.0, 4.0])  # (actions,) seconds
REWARD = torch.tensor([0.5, 1.0])  # (actions,)
# B = 4·WORKERS: each batch spans a slow execution, so a worker on the slow action reaches every batch (a batch
# that closes before any slow action can finish holds none, and no weight can bring it back)
WORKERS, B = 4, 16


class Workers:
    """``WORKERS`` rollout workers on a virtual clock, each executing an action, finishing it ``DURATION[a]`` later
    and starting the next; ``batch`` hands over the first ``B`` executions to finish.

    ``per_version``: at each update every worker draws one action from the new policy and executes it again and again
    until the next update, abandoning what it was running: each action gets a share π(a) of the workers' time, so it
    reaches the trainer at a rate ∝ π(a)/d(a), the case duration weighting is for. Otherwise a worker draws anew for
    every execution and every execution is trained in the end: an action then makes up its share π(a) of the batches
    whatever its duration, since a worker finishes one execution per action it draws."""

    def __init__(self, seed: int, per_version: bool) -> None:
        self.rng, self.per_version = random.Random(seed), per_version
        self.clock, self.started = 0.0, 0
        self.running: list[tuple[float, int, int]] = []  # heap of (finishes at, start order, action)

    def batch(self, probs: torch.Tensor) -> list[int]:
        if self.per_version or not self.running:
            self.running = [self._start(draw(self.rng, probs)) for _ in range(WORKERS)]
            heapq.heapify(self.running)
        actions = []
        while len(actions) < B:
            self.clock, _, action = heapq.heappop(self.running)
            actions.append(action)
            heapq.heappush(self.running, self._start(action if self.per_version else draw(self.rng, probs)))
        return actions

    def _start(self, action: int) -> tuple[float, int, int]:
        self.started += 1
        return self.clock + DURATION[action].item(), self.started, action


def draw(rng: random.Random, probs: torch.Tensor) -> int:
    return SLOW if rng.random() < probs[SLOW].item() else FAST


def reinforce_step(logits: torch.Tensor, actions: list[int], weighted: bool, lr: float) -> torch.Tensor:
    """One baseline-free REINFORCE step through the registered loss: each sample is one token, advantage w·r."""
    index = torch.tensor(actions)
    weights = duration_weights(DURATION[index]) if weighted else torch.ones(len(actions))  # (B,)
    logits = logits.detach().requires_grad_()
    logprobs = torch.log_softmax(logits, -1)[index][:, None]  # (B, 1)
    one = torch.ones(len(actions), 1)
    batch = TrainBatch(one.long(), one.long(), one, logprobs.detach(), logprobs.detach(),
                       (weights * REWARD[index])[:, None], torch.zeros(len(actions), 1, dtype=torch.long))
    loss = policy_loss_fn("reinforce", "seq-mean-token-sum", correction="none")(logprobs, torch.zeros_like(one), batch)
    (grad,) = torch.autograd.grad(loss.loss, logits)
    return (logits - lr * grad).detach()


def train(batching: str, weighted: bool, steps: int = 200, lr: float = 0.5, seed: int = 0) -> float:
    """π(slow) after ``steps`` updates from π = (½, ½). ``sync``: B actions drawn together, all awaited;
    ``first-finisher``: the first B to finish among ``Workers`` that give each policy version's draw their time."""
    rng, workers, logits = random.Random(seed), Workers(seed, per_version=True), torch.zeros(2)
    for _ in range(steps):
        probs = torch.softmax(logits, -1)
        actions = [draw(rng, probs) for _ in range(B)] if batching == "sync" else workers.batch(probs)
        logits = reinforce_step(logits, actions, weighted, lr)
    return torch.softmax(logits, -1)[SLOW].item()


def test_first_finisher_batches_favour_the_fast_worse_action_and_duration_weights_undo_it():
    sync = train("sync", weighted=False)
    first_finisher = train("first-finisher", weighted=False)
    weighted = train("first-finisher", weighted=True)
    assert sync > 0.8, f"synchronous batches should move π toward the slow, better action: π(slow) = {sync:.3f}"
    assert first_finisher < 0.2, f"first-finisher batches should favour the fast action: π(slow) = {first_finisher:.3f}"
    assert weighted > 0.8, f"duration weights should restore the slow action: π(slow) = {weighted:.3f}"


def shares(per_version: bool, batches: int = 500) -> tuple[float, float]:
    """At π = (½, ½): the fast action's share of the samples of first-finisher batches, and of their weight."""
    workers, probs = Workers(seed=1, per_version=per_version), torch.tensor([0.5, 0.5])
    actions = torch.tensor([workers.batch(probs) for _ in range(batches)])  # (batches, B)
    weights = torch.stack([duration_weights(DURATION[a]) for a in actions])  # (batches, B)
    fast = actions == FAST
    return fast.float().mean().item(), (weights * fast).sum().item() / weights.sum().item()


def test_the_weights_restore_pi_where_actions_arrive_at_pi_over_d_and_tilt_it_where_every_sample_is_trained():
    # workers give each version's draw their time: ½·1 / (½·1 + ½·¼) = 0.8 of the samples are fast; weighted, about ½
    # (not exactly: each batch is normalised by its own mean, and a batch ends mid-execution)
    count, weight = shares(per_version=True)
    assert count > 0.75 and 0.45 < weight < 0.65
    # workers draw anew for every execution and lose none: ½ of the samples are fast already, and the weights tilt
    # the batches toward the slow action (∝ π·d: ½·1 / (½·1 + ½·4) = 0.2, a little more for the same reasons)
    count, weight = shares(per_version=False)
    assert abs(count - 0.5) < 0.03 and 0.15 < weight < 0.3
