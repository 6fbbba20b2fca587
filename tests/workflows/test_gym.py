"""Simulator RL through the real runtime: ``GymFragments`` on a rollout worker, the controller, the store, the
staleness budget and ``PolicyGradientStep`` on the policy trainer, on the inline backend and on Ray.

Every trained fragment is checked step by step: its size, and that each action's recorded log-prob is the one the
weights of its recorded version give (so the version is that of the engine that chose it), lagging the trainer by at
most η. On the inline backend the policy must also learn the corridor."""

import asyncio
import copy
import functools
import itertools

import numpy as np
import pytest
import torch

from rollflow.algos.pg import PolicyGradientStep
from rollflow.algos.ppo import APPOStep, PPOStep
from rollflow.api import Column, Fragment, Status
from rollflow.engines.policy import (
    ActorCriticMLP,
    CategoricalMLP,
    TorchPolicyEngine,
    TorchPolicyTrainer,
    action_logprobs,
)
from rollflow.envs import Corridor
from rollflow.envs.corridor import RIGHT
from rollflow.runtime.backend import InlineBackend, Resources
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import TrainerWorker
from rollflow.runtime.rollout import RolloutWorker
from rollflow.runtime.stage import Stage
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.workflows import GymFragments

CELLS, MAX_STEPS = 8, 24  # optimal mean return from a uniform start: 1 − 4·0.05 = 0.8; a random walk's is far lower
STEPS = 16  # steps per fragment
GROUPS = 4  # fragments per train step (group size 1), all in flight at once on one rollout worker
SEED = 0


# -- the workflow on its own ------------------------------------------------------------------------------------------
class AlwaysRight:
    """A ``PolicyEngine`` that always answers RIGHT with log-prob 0, at version 0."""

    version = 0

    def act(self, observations):
        return torch.full((len(observations),), RIGHT), torch.zeros(len(observations))

    def load_weights(self, weights):
        raise AssertionError("nothing is published in these tests")


def rollout_once(loop, worker, tasks):
    out = loop.run_until_complete(worker.rollout([(i, t) for i, t in enumerate(tasks)]))
    return [p.value.payload for p in out.values]


def walk_right(seed, steps):
    """What a corridor reset with ``seed`` shows an always-right policy for ``steps`` steps, resetting on done."""
    env = Corridor(CELLS, MAX_STEPS)
    obs, rewards, dones, returns, ret = [env.reset(seed=seed)[0]], [], [], [], 0.0
    for _ in range(steps):
        o, r, terminated, truncated, _ = env.step(RIGHT)
        ret += r
        rewards.append(r)
        dones.append(terminated or truncated)
        if dones[-1]:
            returns.append(ret)
            ret, o = 0.0, env.reset()[0]
        obs.append(o)
    return torch.from_numpy(np.stack(obs)), torch.tensor(rewards, dtype=torch.float), torch.tensor(dones), returns


def test_fragments_continue_the_same_episode_across_calls():
    loop = asyncio.new_event_loop()
    workflow = GymFragments(functools.partial(Corridor, CELLS, MAX_STEPS), steps=5, seed=7)
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        [first] = rollout_once(loop, worker, [0])
        [second] = rollout_once(loop, worker, [1])
    finally:
        loop.close()
    obs, rewards, dones, returns = walk_right(7, 10)
    assert isinstance(first, Fragment) and first.size == second.size == 5
    assert torch.equal(first.observations[-1], second.observations[0])  # the second picks up where the first stopped
    assert torch.equal(torch.cat([first.observations[:-1], second.observations]), obs)
    assert torch.equal(torch.cat([first.rewards, second.rewards]), rewards)
    assert torch.equal(torch.cat([first.dones, second.dones]), dones)
    assert first.episode_returns + second.episode_returns == pytest.approx(returns)
    # Seed 7 starts on cell 6, then 4, then 4 again: that third episode starts in the first fragment and ends (with
    # its whole return, 1 − 3·0.05) in the second.
    assert (first.episode_returns, second.episode_returns) == (pytest.approx([0.95, 0.85]), pytest.approx([0.85, 0.95]))
    assert torch.equal(torch.cat([first.actions, second.actions]), torch.full((10,), RIGHT))
    assert torch.equal(first.versions, torch.zeros(5, dtype=torch.long))


def test_fragments_tell_termination_from_truncation_and_keep_the_final_observations():
    # 3 steps at most: an always-right walk from far left is cut (truncated), from near the end it arrives (terminated)
    loop = asyncio.new_event_loop()
    workflow = GymFragments(functools.partial(Corridor, CELLS, 3), steps=12, seed=3)
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        [fragment] = rollout_once(loop, worker, [0])
    finally:
        loop.close()
    env = Corridor(CELLS, 3)
    observation, terminated, truncated, after = env.reset(seed=3)[0], [], [], []
    for _ in range(12):
        observation, _, term, trunc, _ = env.step(RIGHT)
        terminated.append(term)
        truncated.append(trunc)
        after.append(torch.as_tensor(observation, dtype=torch.float32))  # before any reset
        if term or trunc:
            observation = env.reset()[0]
    assert any(terminated) and any(truncated)  # both kinds of end in this fragment
    assert fragment.terminated.tolist() == terminated and fragment.truncated.tolist() == truncated
    assert torch.equal(fragment.next_observations(), torch.stack(after))
    assert not torch.equal(fragment.next_observations(), fragment.observations[1:])  # the resets are not what follows
    assert fragment.final_observations.shape == (sum(terminated) + sum(truncated), CELLS)


def test_a_fragment_checks_its_episode_end_columns():
    obs, T = torch.zeros(4, 2), 3
    common = dict(actions=torch.zeros(T), rewards=torch.zeros(T), logprobs=torch.zeros(T),
                  versions=torch.zeros(T, dtype=torch.long))
    dones = torch.tensor([False, True, False])
    legacy = Fragment(obs, dones=dones, **common)  # no terminated: every end counts as terminal
    assert legacy.terminated.tolist() == [False, True, False] and not legacy.truncated.any()
    with pytest.raises(ValueError, match="no final_observations"):
        legacy.next_observations()
    with pytest.raises(ValueError, match="terminated within dones"):
        Fragment(obs, dones=dones, terminated=torch.tensor([True, False, False]), **common)
    with pytest.raises(ValueError, match=r"1 episode ends needs final_observations of shape \(1, 2\); got \(2, 2\)"):
        Fragment(obs, dones=dones, final_observations=torch.zeros(2, 2), **common)


def test_concurrent_episodes_each_get_their_own_environment():
    loop = asyncio.new_event_loop()
    workflow = GymFragments(functools.partial(Corridor, CELLS, MAX_STEPS), steps=3, seed=0)
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        round1 = rollout_once(loop, worker, [0, 1, 2])
        round2 = rollout_once(loop, worker, [3, 4, 5])
    finally:
        loop.close()
    expected = [walk_right(seed, 6)[0] for seed in range(3)]  # env k is first reset with seed k
    # Which env ran which fragment is the pool's business; each env's 6 steps must be one fragment of each round.
    chains = [torch.cat([a.observations[:-1], b.observations]) for a in round1 for b in round2]
    for seed, walk in enumerate(expected):
        assert any(torch.equal(chain, walk) for chain in chains), f"env {seed} did not continue into round 2"
    assert sorted(f.observations[0].argmax().item() for f in round1) == sorted(w[0].argmax().item() for w in expected)


class BrokenOnce(Corridor):
    """A corridor whose step raises once, the first time ``broken`` is set."""

    broken = False

    def step(self, action):
        if BrokenOnce.broken:
            BrokenOnce.broken = False
            raise RuntimeError("simulator crashed")
        return super().step(action)


def test_an_environment_that_failed_is_replaced_by_a_fresh_one():
    loop = asyncio.new_event_loop()
    workflow = GymFragments(functools.partial(BrokenOnce, CELLS, MAX_STEPS), steps=2, seed=0)
    worker = RolloutWorker(AlwaysRight(), InlineWeightTransport(), workflow)
    try:
        BrokenOnce.broken = True
        out = loop.run_until_complete(worker.rollout([(0, 0)]))
        [fresh] = rollout_once(loop, worker, [1])
    finally:
        loop.close()
    failed = out.values[0].value
    assert failed.status is Status.INFRA_ERROR and "simulator crashed" in failed.info["error"]
    assert torch.equal(fresh.observations, walk_right(1, 2)[0])  # env 0 was dropped: env 1, seeded 1, runs


# -- the whole pipeline -----------------------------------------------------------------------------------------------
def make_rollout(model, transport, payloads):
    engine = TorchPolicyEngine(model, seed=SEED)
    return RolloutWorker(engine, transport, GymFragments(functools.partial(Corridor, CELLS, MAX_STEPS), STEPS, SEED),
                         payloads=payloads)


# the policy model and the train step of each algorithm the pipeline runs
ALGORITHMS = {
    "pg": (lambda: CategoricalMLP(CELLS, 2, (32,), seed=SEED), lambda: PolicyGradientStep(gamma=0.95)),
    "ppo": (lambda: ActorCriticMLP(CELLS, 2, (32,), seed=SEED),
            lambda: PPOStep(gamma=0.95, lam=0.9, minibatches=2, epochs=2, entropy_coef=0.01)),
    "appo": (lambda: ActorCriticMLP(CELLS, 2, (32,), seed=SEED),
             lambda: APPOStep(gamma=0.95, minibatches=2, epochs=2, entropy_coef=0.01)),
}


def make_trainer(model, transport, payloads, algo="pg"):
    trainer = TorchPolicyTrainer(model, lr=0.01, seed=SEED)
    return TrainerWorker(trainer, transport, ALGORITHMS[algo][1](), payloads)


def run_pipeline(backend, eta, steps, algo="pg"):
    """Train ``steps`` steps; returns per step (train metrics, trainer version before the step, the fragments), and
    the weights of every version, read from the transport as each was published."""
    transport = backend.weight_transport()
    model = ALGORITHMS[algo][0]()
    rollout = WorkerGroup.spawn(backend, "rollout", RolloutWorker, [
        functools.partial(make_rollout, copy.deepcopy(model), transport, backend.payloads),
    ], Resources(1, 1, concurrency=GROUPS))
    trainer = WorkerGroup.spawn(backend, "trainer", TrainerWorker, [
        functools.partial(make_trainer, model, transport, backend.payloads, algo)], Resources(1, 1))
    backend.wait_started(rollout.workers + trainer.workers)
    trainer.publish()  # version 0: the weights both sides start from
    weights = {0: transport.latest(newer_than=-1)}
    store = SampleStore([Column("task"), Column("fragment", ("task",), versioned=True)])
    stage = Stage("fragment", rollout, "rollout", lambda uid, cells: (uid, cells["task"]), calls_per_worker=GROUPS)
    controller = Controller(store, StalenessBudget(eta, GROUPS), [stage], trainer, itertools.count(),
                            group_size=1, groups_per_step=GROUPS)
    history = []
    for result in controller.run(steps):
        weights[result.train.version] = transport.latest(newer_than=result.train.version - 1)
        cells = [row["fragment"] for group in result.groups for row in group]
        # The driver's rows keep their light cells; the fragments are in the payload store (Ray's object store).
        fragments = backend.payloads.get([c.payload for c in cells])
        history.append((result.train.metrics, result.train.version - 1, fragments))
    return history, weights


def check_fragments(history, weights, eta, algo="pg"):
    """Every trained fragment: exactly STEPS steps, and each action's log-prob is what its recorded version's weights
    give it, that version lagging the trainer by at most η. Returns every lag seen."""
    model = ALGORITHMS[algo][0]()
    lags = []
    for metrics, trained_at, fragments in history:
        assert len(fragments) == GROUPS
        step_lags = []
        for f in fragments:
            assert f.status is Status.OK and f.size == STEPS
            assert f.observations.shape == (STEPS + 1, CELLS) and f.actions.shape == (STEPS,)
            for v in f.versions.unique().tolist():
                at = f.versions == v
                model.load_state_dict(weights[v].tensors)
                with torch.no_grad():
                    logp, _ = action_logprobs(model, f.observations[:-1][at], f.actions[at])
                torch.testing.assert_close(logp, f.logprobs[at], atol=1e-5, rtol=0)
            step_lags += (trained_at - f.versions).tolist()
        assert 0 <= min(step_lags) and max(step_lags) <= eta
        assert metrics["staleness/max"] == max(step_lags)  # the step reports the lag it trained on
        lags += step_lags
    return lags


def mean_return(history, k):
    first = [m["episode/return_mean"] for m, _, _ in history[:k]]
    last = [m["episode/return_mean"] for m, _, _ in history[-k:]]
    return sum(first) / k, sum(last) / k


@pytest.mark.parametrize("eta", [0, 1])
def test_inline_pipeline_trains_fragments_within_the_staleness_bound(eta):
    backend = InlineBackend()
    try:
        history, weights = run_pipeline(backend, eta, steps=8)
    finally:
        backend.shutdown()
    lags = check_fragments(history, weights, eta)
    assert max(lags) == eta  # η = 0: every action from the trainer's own version; η = 1: the run overlapped
    assert [trained_at for _, trained_at, _ in history] == list(range(8))


@pytest.mark.parametrize("algo", ["pg", "ppo", "appo"])
def test_inline_pipeline_learns_the_corridor(algo):
    backend = InlineBackend()
    try:
        history, weights = run_pipeline(backend, eta=1, steps=30, algo=algo)
    finally:
        backend.shutdown()
    check_fragments(history, weights, eta=1, algo=algo)
    first, last = mean_return(history, 5)
    # the optimum is 0.8; PPO's four updates a step take it most of the way within the first five steps
    gain = {"pg": 0.3, "ppo": 0.15, "appo": 0.15}[algo]
    assert last > first + gain and last > 0.7, (first, last)
    if algo != "pg":  # the critic learned too: it explains most of the returns' variance by the end
        assert history[-1][0]["value/explained_variance"] > 0.5, history[-1][0]


@pytest.mark.slow
def test_ray_pipeline_trains_fragments_within_the_staleness_bound():
    from rollflow.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    backend = RayBackend(num_cpus=2)
    try:
        history, weights = run_pipeline(backend, eta=1, steps=20)
    finally:
        backend.shutdown()
    check_fragments(history, weights, eta=1)
    first, last = mean_return(history, 5)
    assert last > first + 0.2, (first, last)
