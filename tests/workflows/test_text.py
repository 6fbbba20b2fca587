"""A two-turn text workflow through the real controller, store and trainer, on both backends: a fake environment whose
steps take scripted, variable time, so episodes finish out of order and enter the store as they finish; every
trajectory's token ids, loss mask, log-probs and versions are checked turn by turn."""

import functools
import itertools

import pytest

from rollflow.algos import ADVANTAGES, policy_loss_fn
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import Column, SamplingParams, Status
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.recipes.grpo import score_text
from rollflow.runtime.backend import InlineBackend, Resources
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import RewardWorker, TrainerWorker
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.stage import Stage
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.testing import FakeEngine, FakeTextEnv
from rollflow.workflows import AgentLoop, Tokens

GROUPS, SIZE, STEPS, ETA = 2, 2, 3, 1
SLOW = 0.3  # seconds an even task's environment step takes; odd tasks' take none


def slow_if_even(task, turn):
    return SLOW if task % 2 == 0 else 0.0


def env():
    # Prompt "<task>+"; the observation after turn t is "=" * t; reward 1 if the last answer is the task's last digit.
    return FakeTextEnv(turns=2, durations=slow_if_even, observe=lambda task, turn, action: "=" * turn,
                       reward=lambda task, action: float(action == str(task % 10)), prompt=lambda task: f"{task}+")


def answer(tokenizer, prompt_ids):
    """The fake policy: the digit (number of tokens so far) mod 10, then EOS."""
    return [tokenizer.convert_tokens_to_ids(str(len(prompt_ids) % 10)), tokenizer.eos_token_id]


def rollout_worker(tokenizer, transport, payloads):
    engine = FakeEngine(functools.partial(answer, tokenizer), eos=tokenizer.eos_token_id, text=tokenizer.decode)
    params = SamplingParams(max_new_tokens=4)
    return RolloutWorker(engine, transport, AgentLoop(env, Tokens(tokenizer), max_turns=2), params, payloads,
                         Limits(episode=30.0, env=10.0))


def trainer_worker(model, tokenizer, transport, payloads):
    algorithm = Algorithm(ADVANTAGES.get("grpo"), policy_loss_fn("ppo_clip", "token-mean"))
    return TrainerWorker(TorchTrainEngine(model, lr=1e-3), transport, TextPolicyStep(algorithm, tokenizer.pad_token_id), payloads)


def run(backend, tokenizer, model):
    transport, payloads = backend.weight_transport(), backend.payloads
    rollout = WorkerGroup.spawn(backend, "rollout", RolloutWorker, [
        functools.partial(rollout_worker, tokenizer, transport, payloads)], Resources(0, 1, concurrency=16))
    reward = WorkerGroup.spawn(backend, "reward", RewardWorker, [
        functools.partial(RewardWorker, functools.partial(score_text, None))], Resources(0, 1))
    trainer = WorkerGroup.spawn(backend, "trainer", TrainerWorker, [
        functools.partial(trainer_worker, model, tokenizer, transport, payloads)], Resources(0, 1))
    backend.wait_started([*rollout.workers, *reward.workers, *trainer.workers])
    trainer.publish()
    store = SampleStore([Column("task"), Column("trajectory", ("task",), versioned=True), Column("reward", ("trajectory",))])
    stages = [
        Stage("trajectory", rollout, "rollout", lambda uid, cells: (uid, cells["task"]), calls_per_worker=16, whole_groups=False),
        Stage("reward", reward, "score", lambda uid, cells: (uid, cells["task"], cells["trajectory"]), calls_per_worker=4),
    ]
    controller = Controller(store, StalenessBudget(ETA, GROUPS * SIZE), stages, trainer, itertools.count(),
                            group_size=SIZE, groups_per_step=GROUPS, version=trainer.version())
    return list(controller.run(STEPS))


def check_turn_by_turn(results, tokenizer, payloads):
    tokens = Tokens(tokenizer)
    rows = [(r.train.version, row) for r in results for g in r.groups for row in g]
    assert len(rows) == STEPS * GROUPS * SIZE
    trajectories = payloads.get([row["trajectory"].payload for _, row in rows])  # the driver holds light cells
    for (trained_at, row), t in zip(rows, trajectories):
        task = row["task"]
        assert row["trajectory"].version == t.version and row["trajectory"].size == t.size == 4
        prompt = tokens.prompt(f"{task}+")
        first = answer(tokenizer, prompt)
        observation = tokens.encode("=")
        second = answer(tokenizer, prompt + first + observation)
        assert t.tokens == prompt + first + observation + second  # ids exactly as produced, never re-tokenised
        # the last step's observation is not shown: an empty env turn keeps its span
        assert [turn.source for turn in t.turns] == ["prompt", "model", "env", "model", "env"]
        n = len(t.tokens)
        assert [(turn.start, turn.end) for turn in t.turns] == [
            (0, len(prompt)), (len(prompt), len(prompt) + 2), (len(prompt) + 2, len(prompt) + 3), (n - 2, n), (n, n)]
        assert t.loss_mask == [0] * len(prompt) + [1, 1] + [0] + [1, 1]
        assert t.logprobs == [0.0] * len(prompt) + [-0.5, -0.5, 0.0, -0.5, -0.5]
        v1, v2 = t.versions[len(prompt)], t.versions[-1]
        assert t.versions == [-1] * len(prompt) + [v1, v1, -1, v2, v2]  # one version per model turn
        assert v1 <= v2 < trained_at and trained_at - 1 - v1 <= ETA  # the trainer's version before the step
        # the environment's step took its scripted time: the env turn spans it (for the first step, on even tasks)
        env_turn = t.turns[2]
        assert env_turn.duration >= (SLOW if task % 2 == 0 else 0.0) * 0.9
        assert row["reward"].result.reward == float(tokenizer.decode(second[:1]) == str(task % 10))
        assert row.status is Status.OK


def check_out_of_order(results):
    rows = sorted((row for r in results for g in r.groups for row in g), key=lambda row: row.uid)
    entered = sorted(rows, key=lambda row: row.timestamps["trajectory"])
    assert [row.uid for row in entered] != [row.uid for row in rows]  # fast (odd) tasks overtook slow (even) ones
    # the first episode to enter the store is a fast one, although a slow one (task 0) was admitted first
    assert entered[0]["task"] % 2 == 1 and rows[0]["task"] == 0
    # each episode entered on its own: the two episodes of a slow group entered no earlier than a fast one admitted later
    first_fast = min(row.timestamps["trajectory"] for row in rows if row["task"] % 2 == 1)
    assert all(row.timestamps["trajectory"] > first_fast for row in rows if row["task"] == 0)


def make_backend(name):
    if name == "inline":
        return InlineBackend()
    from rollflow.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    return RayBackend(num_cpus=2)


@pytest.mark.parametrize("backend_name", ["inline", pytest.param("ray", marks=pytest.mark.slow)])
def test_two_turn_workflow(tokenizer, make_model, backend_name):
    backend = make_backend(backend_name)
    try:
        results = run(backend, tokenizer, make_model())
        check_turn_by_turn(results, tokenizer, backend.payloads)
    finally:
        backend.shutdown()
    check_out_of_order(results)
    assert [r.train.version for r in results] == [1, 2, 3]  # one optimizer version per step


def test_single_turn_tokenises_a_prompt_once_per_group_and_keeps_the_last_prompts(tokenizer):
    from rollflow.workflows import SingleTurn

    calls = []

    class Counting(Tokens):
        def prompt(self, text):
            calls.append(text)
            return super().prompt(text)

    workflow = SingleTurn(Counting(tokenizer), cache=2)
    ids = [workflow.prompt_ids(t) for t in ("1+2=", "1+2=", "3+4=", "5+6=", "1+2=")]
    assert ids[0] == ids[1] == ids[4] == Tokens(tokenizer).prompt("1+2=")
    assert calls == ["1+2=", "3+4=", "5+6=", "1+2="]  # the third prompt pushed the first out of the cache
    ids[0].append(99)
    assert workflow.prompt_ids("1+2=") == ids[4]  # callers get their own list
