"""The agent loop on the real engine: token in, token out across turns (the ids trained are the ids sampled, and the
log-probs recorded with them are what the policy gives them in the trained context), masks, statuses, timeouts and
faults of single episodes, discounted turn rewards, and greedy evaluation episodes."""

import asyncio

import pytest
import torch

from rollflow.api import SamplingParams, Status, StepResult, TrainBatch
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import char_tokenizer, tiny_model
from rollflow.engines.torch_train import TorchScorer
from rollflow.runtime.backend import InlineBackend
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.tasks.guess import GuessTask
from rollflow.testing import FakeEngine
from rollflow.workflows import AgentLoop, Tokens
from tests.conftest import TINY


def rollout(worker, items, method="rollout", *args):
    backend = InlineBackend()
    try:
        return backend.result(backend.submit(worker, method, items, *args))
    finally:
        backend.shutdown()


def test_trained_ids_are_the_sampled_ids_across_turns():
    task = GuessTask()
    tokenizer = char_tokenizer(task.alphabet())
    model = tiny_model(TINY, tokenizer, seed=3)
    engine = HFInferenceEngine(model, tokenizer, seed=1)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    loop = AgentLoop(task.make_env, Tokens(tokenizer), max_turns=3)
    worker = RolloutWorker(engine, InlineWeightTransport(), loop, params)
    problems = task.eval_problems()[:12]
    out = rollout(worker, list(enumerate(problems)))
    trajectories = worker.payloads.get([p.value.payload for p in out.values])
    tokens = Tokens(tokenizer)
    re_encoded_differs = False
    for problem, t in zip(problems, trajectories):
        assert t.tokens[: len(tokens.prompt(problem.prompt))] == tokens.prompt(problem.prompt)
        sources = [turn.source for turn in t.turns]
        assert sources[0] == "prompt" and sources[1::2] == ["model"] * len(sources[1::2])
        for turn in t.turns:
            ids, mask = t.tokens[turn.start : turn.end], t.loss_mask[turn.start : turn.end]
            assert mask == [int(turn.source == "model")] * len(ids)  # model tokens trained, the rest context
            if turn.source == "model":
                text = tokenizer.decode(ids, skip_special_tokens=True)
                re_encoded_differs |= tokens.encode(text) != ids
    # An untrained model samples special tokens (EOS, PAD, BOS) that text would lose: re-tokenising would differ.
    assert re_encoded_differs
    # The ids trained are the ids sampled, in the context they were sampled in: scoring the batch the trainer builds
    # gives back every recorded behaviour log-prob.
    batch = TrainBatch.from_trajectories(trajectories, tokenizer.pad_token_id)
    for i, t in enumerate(trajectories):
        assert batch.input_ids[i, : len(t.tokens)].tolist() == t.tokens
    scored = TorchScorer(model).compute_logprobs(batch)
    mask = batch.response_mask.bool()
    torch.testing.assert_close(scored[mask], batch.behav_logprobs[mask], atol=2e-4, rtol=0)


def fake_worker(env_factory, answers, limits=None, max_turns=4, discount=1.0, tokenizer=None):
    """A fake policy answering the scripted texts in turn (each then EOS), on a char tokenizer."""
    tokenizer = tokenizer or char_tokenizer("0123456789+=?abcdefghijklmnopqrstuvwxyz'() ")
    script = iter(answers * 100)

    def respond(prompt_ids):
        return [*tokenizer(next(script), add_special_tokens=False).input_ids, tokenizer.eos_token_id]

    engine = FakeEngine(respond, eos=tokenizer.eos_token_id, text=lambda ids: tokenizer.decode(ids))
    loop = AgentLoop(env_factory, Tokens(tokenizer), max_turns=max_turns, discount=discount)
    return RolloutWorker(engine, InlineWeightTransport(), loop, SamplingParams(max_new_tokens=12), limits=limits or Limits())


def cells(worker, tasks):
    return [p.value for p in rollout(worker, list(enumerate(tasks))).values]


def test_turn_rewards_are_discounted_and_the_last_observation_is_not_shown():
    rewards = {0: 1.0, 1: 0.5, 2: 2.0}

    class Scripted:
        async def reset(self, task):
            self.turn = 0
            return "q"

        async def step(self, action):
            r = rewards[self.turn]
            self.turn += 1
            return StepResult("ab", r, self.turn == 3, {"status": "ok"})

    [cell] = cells(fake_worker(Scripted, ["1"], discount=0.5), ["t"])
    assert cell.reward.reward == pytest.approx(1.0 + 0.5 * 0.5 + 0.25 * 2.0)
    assert cell.reward.breakdown == {"return": pytest.approx(1.75), "turns": 3.0}
    assert cell.info["turn_rewards"] == [1.0, 0.5, 2.0] and cell.info["done"] and cell.status is Status.OK


def test_an_episode_takes_its_last_steps_status_and_stops_at_max_turns():
    class Crashes:
        async def reset(self, task):
            return "q"

        async def step(self, action):
            return StepResult("", -10.0, True, {"status": "agent_error"})

    class Endless:
        async def reset(self, task):
            return "q"

        async def step(self, action):
            return StepResult("a", 0.0, False)

    [crashed] = cells(fake_worker(Crashes, ["1"]), ["t"])
    assert crashed.status is Status.AGENT_ERROR and crashed.reward.reward == -10.0
    assert crashed.reward.status is Status.AGENT_ERROR
    [endless] = cells(fake_worker(Endless, ["1"], max_turns=3), ["t"])
    assert endless.status is Status.OK and endless.info["turns"] == 3 and not endless.info["done"]


def test_one_failing_or_slow_episode_does_not_take_down_the_batch():
    class ByTask:
        """Task "raise": the environment crashes; "slow": a step runs past env_timeout; else a quick right answer."""

        async def reset(self, task):
            self.task = task
            return "q"

        async def step(self, action):
            if self.task == "raise":
                raise ConnectionError("tool server unreachable")
            if self.task == "slow":
                await asyncio.sleep(5)
            return StepResult("", 1.0, True)

    worker = fake_worker(ByTask, ["1"], limits=Limits(env=0.3, episode=10))
    ok, raised, slow, ok2 = cells(worker, ["a", "raise", "slow", "b"])
    assert ok.status is Status.OK and ok.reward.reward == 1.0 and ok2.status is Status.OK
    assert raised.status is Status.INFRA_ERROR and "ConnectionError: tool server unreachable" in raised.info["error"]
    assert slow.status is Status.TIMEOUT and "env_timeout=0.3" in slow.info["error"]
    assert slow.size == 2  # the model turn it made ("1" + EOS) is kept, to be trained with the timeout's reward


def test_guess_task_episode_with_the_tool_and_a_malformed_call():
    task = GuessTask()
    problem = task.eval_problems()[0]
    a, b = problem.prompt[0], problem.prompt[2]
    table = problem.meta["table"]
    answers = [f"get('{a}'", f"get('{a}')", f"get('{b}')", problem.answer]
    tokenizer = char_tokenizer(task.alphabet())
    [cell] = cells(fake_worker(task.make_env, answers, tokenizer=tokenizer), [problem])
    assert cell.reward.reward == 1.0 and cell.status is Status.OK and cell.info["turns"] == 4
    assert cell.text == problem.answer
    worker = fake_worker(task.make_env, answers, tokenizer=tokenizer)
    out = rollout(worker, [(0, problem)])
    [t] = worker.payloads.get([out.values[0].value.payload])
    observations = [tokenizer.decode(t.tokens[turn.start : turn.end]) for turn in t.turns if turn.source == "env"]
    assert observations == ["?", str(table[a]), str(table[b]), ""]  # the malformed call is answered "?"
    assert cell.info["transcript"] == [  # the episode as a run's rollouts.jsonl shows it (its "turns")
        ["model", f"get('{a}'"], ["env", "?"], ["model", f"get('{a}')"], ["env", str(table[a])],
        ["model", f"get('{b}')"], ["env", str(table[b])], ["model", problem.answer]]


def test_evaluation_episodes_decode_greedily():
    seen = []

    class Records:
        async def reset(self, task):
            return "q"

        async def step(self, action):
            return StepResult("", 1.0, True)

    worker = fake_worker(Records, ["1"])
    engine = worker.engine
    original = engine.generate

    def spy(prompts, params):
        seen.append(params)
        return original(prompts, params)

    engine.generate = spy
    greedy = SamplingParams(greedy=True, max_new_tokens=5)
    [(uid, cell)] = rollout(worker, [(7, "t")], "episodes", greedy)
    assert uid == 7 and cell.reward.reward == 1.0 and cell.payload is None
    assert seen == [greedy]


def test_guess_demonstration_is_tokenised_as_the_loop_produces_episodes():
    task = GuessTask(demo_skip=0.0)
    tokenizer = char_tokenizer(task.alphabet())
    tokens = Tokens(tokenizer)
    problem = task.eval_problems()[0]
    demo = task.demonstration(problem)
    assert [s for s, _ in demo] == ["prompt", "model", "env", "model", "env", "model"]
    t = tokens.episode(demo)
    a, b = problem.prompt[0], problem.prompt[2]
    eos = tokenizer.eos_token_id
    expected = (tokens.prompt(problem.prompt) + tokens.encode(f"get('{a}')") + [eos]
                + tokens.encode(str(problem.meta["table"][a])) + tokens.encode(f"get('{b}')") + [eos]
                + tokens.encode(str(problem.meta["table"][b])) + tokens.encode(problem.answer) + [eos])
    assert t.tokens == expected
    assert sum(t.loss_mask) == len(f"get('{a}')") + 1 + len(f"get('{b}')") + 1 + len(problem.answer) + 1
    with pytest.raises(ValueError, match="characters '!' are not in the tokenizer's vocabulary"):
        tokens.encode("a!")
