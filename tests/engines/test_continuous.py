"""Continuous batching in the HF engine (``open_session``): rows that join at different steps, with different prompt
lengths and budgets, decode exactly as ``generate`` decodes each of them alone."""

import copy

import pytest
import torch

from rollflow.algos.batch import collate
from rollflow.api import SamplingParams, VersionedWeights
from rollflow.engines.hf_inference import HFInferenceEngine, top_p_filter
from rollflow.engines.torch_train import token_logprobs

TEXTS = ["1+2=", "12+345=", "9", "77+8=", "123456789+1=", "4"]


@pytest.fixture
def prompts(tokenizer):
    return [[tokenizer.bos_token_id, *tokenizer.encode(t)] for t in TEXTS]


def greedy(n):
    return SamplingParams(greedy=True, max_new_tokens=n)


def run(session, schedule, steps=60):
    """``schedule``: {step: [(key, prompt, params), ...]} rows added before that step. Returns {key: generation} and
    the number of rows in flight before each step."""
    keys, out, sizes = {}, {}, []
    for step in range(steps):
        for key, prompt, params in schedule.get(step, []):
            keys[session.add(prompt, params)] = key
        sizes.append(len(session))
        out.update((keys.get(slot, slot), g) for slot, g in session.step())
    assert len(session) == 0
    return out, sizes


def assert_same(a, b):
    assert a.response_ids == b.response_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert (a.response_text, a.finish_reason, a.versions) == (b.response_text, b.finish_reason, b.versions)


BUDGETS = [8, 5, 12, 3, 9, 6]
JOINS = {0: [0, 1], 2: [2], 3: [3], 6: [4], 7: [5]}  # step -> prompts joining then (two at once at step 0)


def test_rows_joining_and_leaving_decode_as_generate_alone(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer)
    alone = [engine.generate([p], greedy(n))[0] for p, n in zip(prompts, BUDGETS)]
    schedule = {s: [(i, prompts[i], greedy(BUDGETS[i])) for i in rows] for s, rows in JOINS.items()}
    out, sizes = run(engine.open_session(), schedule)
    for i, g in enumerate(alone):
        assert_same(out[i], g)
        assert len(out[i].response_ids) == BUDGETS[i] and out[i].finish_reason == "length"
    assert max(sizes) >= 4  # rows really decoded side by side
    assert any(len(set(g.response_ids)) > 2 for g in alone)  # the fixture model gives the comparison teeth


def test_rows_stopping_at_eos_leave_while_the_others_go_on(model, tokenizer, prompts):
    # Make a token prompt 0 picks mid-answer the EOS (as test_inference does), so rows stop at different steps.
    first = HFInferenceEngine(model, tokenizer).generate([prompts[0]], greedy(12))[0].response_ids
    stop_at = next(k for k in range(1, len(first)) if first[k] not in first[:k])
    eos_tok = copy.deepcopy(tokenizer)
    eos_tok.eos_token = tokenizer.convert_ids_to_tokens(first[stop_at])
    engine = HFInferenceEngine(model, eos_tok)
    alone = [engine.generate([p], greedy(12))[0] for p in prompts]
    out, _ = run(engine.open_session(), {s: [(i, prompts[i], greedy(12)) for i in rows] for s, rows in JOINS.items()})
    for i, g in enumerate(alone):
        assert_same(out[i], g)
    assert out[0].finish_reason == "eos" and out[0].response_ids[-1] == eos_tok.eos_token_id
    assert {g.finish_reason for g in out.values()} == {"eos", "length"}


def test_mixed_sampling_params_in_one_session(model, tokenizer, prompts):
    hot = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6)
    warm = SamplingParams(temperature=1.3, top_p=1.0, max_new_tokens=4)
    params = [greedy(7), hot, warm, greedy(5), hot, warm]
    schedule = {s: [(i, prompts[i], params[i]) for i in rows] for s, rows in JOINS.items()}

    def sampled(seed):
        return run(HFInferenceEngine(model, tokenizer, seed=seed).open_session(), schedule)[0]

    a = sampled(7)
    assert sampled(7) == a  # reproducible with a seed
    assert sampled(8) != a
    for i, p in enumerate(params):
        assert len(a[i].response_ids) == p.max_new_tokens  # each row's own budget (no EOS on these prompts)
    engine = HFInferenceEngine(model, tokenizer)
    for i in (0, 3):  # greedy rows beside sampled ones are still generate's greedy answer
        assert_same(a[i], engine.generate([prompts[i]], params[i])[0])

    # every row's log-probs are its own temperature's, before top-p, as the trainer scores them
    for i, p in enumerate(params):
        batch = collate([prompts[i]], [a[i].response_ids], tokenizer.pad_token_id)
        with torch.no_grad():
            logp, _ = token_logprobs(model, batch, temperature=1.0 if p.greedy else p.temperature)
        start = len(prompts[i])
        assert a[i].logprobs == pytest.approx(logp[0, start : start + len(a[i].response_ids)].tolist(), abs=1e-4)


def test_dropped_rows_leave_and_the_cache_keeps_only_the_longest_row(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer)
    session = engine.open_session()
    long_row = session.add(prompts[4], greedy(20))  # 13-token prompt
    short = session.add(prompts[2], greedy(10))  # 2-token prompt, left-padded by 11 in the cache
    session.step()
    session.step()
    assert session.mask.shape == (2, 15)
    session.drop(long_row)
    assert len(session) == 1 and session.mask.shape == (1, 4)  # the shared padding is cut off: prompt + 2 tokens
    session.drop(12345)  # unknown: ignored
    out = []
    while len(session):
        out += session.step()
    [(slot, g)] = out
    assert slot == short
    assert_same(g, engine.generate([prompts[2]], greedy(10))[0])


def test_versions_are_the_sessions_and_weights_may_not_change_under_rows_in_flight(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer)
    engine.load_weights(VersionedWeights.pack(2, model.state_dict()))
    session = engine.open_session()
    session.add(prompts[0], greedy(4))
    assert session.step() == []
    engine.load_weights(VersionedWeights.pack(3, model.state_dict()))
    with pytest.raises(RuntimeError, match="weights changed from version 2 to 3 under a decode session"):
        session.step()

    session = engine.open_session()
    session.add(prompts[1], greedy(3))
    out, _ = run(session, {})
    [g] = out.values()
    assert g.versions == [3, 3, 3]
    engine.load_weights(VersionedWeights.pack(4, model.state_dict()))  # an empty session takes the new weights
    session.add(prompts[1], greedy(2))
    out, _ = run(session, {})
    [g] = out.values()
    assert g.versions == [4, 4]


def test_bad_rows_are_refused_when_added(model, tokenizer):
    session = HFInferenceEngine(model, tokenizer).open_session()
    with pytest.raises(ValueError, match="empty prompt"):
        session.add([], greedy(3))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        session.add([1], greedy(0))
    assert len(session) == 0


def test_top_p_per_row_equals_top_p_of_each_row():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    top_p = [0.3, 1.0, 0.9, 0.5]
    per_row = top_p_filter(logits, torch.tensor(top_p)[:, None])
    for i, p in enumerate(top_p):
        assert torch.equal(per_row[i], top_p_filter(logits[i : i + 1], p)[0])
    assert torch.equal(top_p_filter(logits, torch.ones(4, 1)), logits)
