"""``VectorFragments``, the simulator actor: environments stepped in lockstep on a rollout worker, one batched policy
request per step, fragments that continue across calls, and faults confined to the environment that had them."""

import asyncio
import functools
import time

import numpy as np
import pytest
import torch

from rollflow.api import Fragment, Status
from rollflow.envs import Corridor
from rollflow.envs.corridor import RIGHT
from rollflow.runtime.rollout import RolloutWorker
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.workflows import VectorFragments

CELLS, MAX_STEPS = 8, 24


class AlwaysRight:
    """A ``PolicyEngine`` that answers RIGHT for every observation, log-prob 0, version 0; counts its calls."""

    version = 0

    def __init__(self):
        self.batches = []

    def act(self, observations):
        self.batches.append(len(observations))
        return torch.full((len(observations),), RIGHT), torch.zeros(len(observations))

    def load_weights(self, weights):
        raise AssertionError("nothing is published in these tests")


def walk_right(seed, steps, reset_first=True, env=None):
    """What a corridor (reset with ``seed``) shows an always-right policy for ``steps`` steps."""
    env = env or Corridor(CELLS, MAX_STEPS)
    obs = [env.reset(seed=seed)[0]] if reset_first else []
    rewards, dones = [], []
    for _ in range(steps):
        o, r, terminated, truncated, _ = env.step(RIGHT)
        rewards.append(r)
        dones.append(terminated or truncated)
        if dones[-1]:
            o = env.reset()[0]
        obs.append(o)
    return torch.from_numpy(np.stack(obs)).float(), torch.tensor(rewards, dtype=torch.float), torch.tensor(dones)


def call(loop, worker, n):
    out = loop.run_until_complete(worker.rollout([(i, 0) for i in range(n)]))
    return [p.value for p in out.values]


def test_a_call_steps_its_environments_in_lockstep_and_the_next_call_continues_them():
    loop, engine = asyncio.new_event_loop(), AlwaysRight()
    workflow = VectorFragments(functools.partial(Corridor, CELLS, MAX_STEPS), steps=5, seed=10)
    worker = RolloutWorker(engine, InlineWeightTransport(), workflow)
    try:
        first = [c.payload for c in call(loop, worker, 3)]
        second = [c.payload for c in call(loop, worker, 3)]
    finally:
        loop.close()
    assert engine.batches == [3] * 10  # one request per step, for all three environments
    assert all(isinstance(f, Fragment) and f.size == 5 and f.status is Status.OK for f in first + second)
    # Environment k was reset with seed 10 + k; which lane holds which environment in the second call is the pool's
    # business, so each seed's walk must be one first fragment followed by one second fragment.
    chains = [(torch.cat([a.observations[:-1], b.observations]), torch.cat([a.rewards, b.rewards]),
               torch.cat([a.dones, b.dones])) for a in first for b in second]
    for seed in (10, 11, 12):
        obs, rewards, dones = walk_right(seed, 10)
        assert any(torch.equal(o, obs) and torch.equal(r, rewards) and torch.equal(d, dones) for o, r, d in chains), seed
    assert sorted(f.observations[0].argmax().item() for f in first) == sorted(
        walk_right(s, 0)[0][0].argmax().item() for s in (10, 11, 12))


def test_fragments_record_ends_final_observations_and_episode_returns():
    loop = asyncio.new_event_loop()
    workflow = VectorFragments(functools.partial(Corridor, CELLS, 3), steps=12, seed=3)  # 3 steps at most an episode
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        [cell] = call(loop, worker, 1)
    finally:
        loop.close()
    fragment = cell.payload
    env = Corridor(CELLS, 3)
    observation, terminated, truncated, finals, returns, ret = env.reset(seed=3)[0], [], [], [], [], 0.0
    for _ in range(12):
        observation, r, term, trunc, _ = env.step(RIGHT)
        ret += r
        terminated.append(term)
        truncated.append(trunc)
        if term or trunc:
            finals.append(torch.as_tensor(observation, dtype=torch.float32))
            returns.append(ret)
            ret, observation = 0.0, env.reset()[0]
    assert any(terminated) and any(truncated)
    assert fragment.terminated.tolist() == terminated and fragment.truncated.tolist() == truncated
    assert torch.equal(fragment.final_observations, torch.stack(finals))
    assert fragment.episode_returns == pytest.approx(returns)
    assert cell.info["episode_returns"] == pytest.approx(returns)  # the driver reads them from the light cell
    assert cell.info["episode_lengths"] == [int(n) for n in np.diff([-1, *np.flatnonzero(fragment.dones.numpy())])]


class Flaky(Corridor):
    """A corridor that raises (``mode='raise'``) or hangs (``mode='hang'``) at its ``at``-th step, once per instance
    that is told to; ``made`` lists every instance."""

    made = []
    fail_instance, mode, at = 1, "raise", 2

    def __init__(self):
        super().__init__(CELLS, MAX_STEPS)
        self.calls = 0
        self.index = len(Flaky.made)
        Flaky.made.append(self)

    def step(self, action):
        self.calls += 1
        if self.index == Flaky.fail_instance and self.calls == Flaky.at:
            if Flaky.mode == "raise":
                raise RuntimeError("simulator crashed")
            time.sleep(3)  # a hang, as far as a 0.3 s step timeout can tell
        return super().step(action)


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_environment_loses_only_its_fragment_and_is_replaced(mode):
    Flaky.made, Flaky.mode = [], mode
    loop = asyncio.new_event_loop()
    workflow = VectorFragments(Flaky, steps=4, seed=0, step_timeout=0.3 if mode == "hang" else None)
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        started = time.perf_counter()
        cells = call(loop, worker, 3)
        took = time.perf_counter() - started
        again = call(loop, worker, 3)
    finally:
        loop.close()
    statuses = [c.status for c in cells]
    assert statuses == [Status.OK, Status.INFRA_ERROR, Status.OK]  # only the second environment failed
    why = {"raise": "step raised RuntimeError: simulator crashed", "hang": "did not return within sim.step_timeout=0.3 s"}
    assert why[mode] in cells[1].info["error"]
    if mode == "hang":
        assert took < 2.5  # the call did not wait for the hung step
    assert workflow.dropped == 1
    # The healthy environments went on exactly as if nothing had happened.
    for k in (0, 2):
        assert torch.equal(cells[k].payload.observations, walk_right(k, 4)[0])
    # The next call takes them back and makes one fresh environment, seeded after the three made before.
    assert all(c.status is Status.OK for c in again) and len(Flaky.made) == 4 and workflow.made == 4
    fresh = [c.payload for c in again if torch.equal(c.payload.observations[0], walk_right(3, 0)[0][0])]
    assert fresh and torch.equal(fresh[0].observations, walk_right(3, 4)[0])


def test_an_environment_that_cannot_be_made_is_an_infrastructure_fault_of_the_call():
    def broken():
        raise OSError("simulator binary missing")

    loop = asyncio.new_event_loop()
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), VectorFragments(broken, steps=2))
    try:
        cells = call(loop, worker, 2)
    finally:
        loop.close()
    assert [c.status for c in cells] == [Status.INFRA_ERROR] * 2
    assert "making environment 0 (seed 0) failed: OSError: simulator binary missing" in cells[0].info["error"]


def test_actions_in_one_call_come_from_one_version_picked_up_at_its_start():
    from rollflow.api import VersionedWeights
    from rollflow.engines.policy import ActorCriticMLP, TorchPolicyEngine

    transport = InlineWeightTransport()
    model = ActorCriticMLP(CELLS, 2, (8,))
    engine = TorchPolicyEngine(ActorCriticMLP(CELLS, 2, (8,)))
    worker = RolloutWorker(engine, transport, VectorFragments(functools.partial(Corridor, CELLS, MAX_STEPS), steps=3))
    loop = asyncio.new_event_loop()
    try:
        transport.publish(VersionedWeights.pack(4, model.state_dict()))
        cells = call(loop, worker, 2)
    finally:
        loop.close()
    assert all(c.payload.versions.tolist() == [4, 4, 4] for c in cells) and engine.version == 4
