import copy

import pytest
import torch

from rollflow.algos.batch import collate
from rollflow.api import SamplingParams, VersionedWeights
from rollflow.engines.hf_inference import HFInferenceEngine, top_p_filter
from rollflow.engines.torch_train import token_logprobs

TEXTS = ["1+2=", "12+345=", "9"]  # different lengths: the batch is left-padded to the longest


@pytest.fixture
def prompts(tokenizer):
    return [[tokenizer.bos_token_id, *tokenizer.encode(t)] for t in TEXTS]


@torch.no_grad()
def naive_generate(model, prompt, max_new_tokens, eos):
    """Greedy reference: the whole unpadded sequence is recomputed every step, no cache, no batch."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(max_new_tokens):
        logp = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float().log_softmax(-1)
        tok = int(logp.argmax())
        tokens.append(tok)
        logprobs.append(logp[tok].item())
        ids.append(tok)
        if tok == eos:
            break
    return tokens, logprobs


GREEDY = SamplingParams(greedy=True, max_new_tokens=8)


def test_greedy_matches_naive_loop_across_prompt_lengths(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer)
    gens = engine.generate(prompts, GREEDY)
    assert len(gens) == len(prompts)
    for prompt, g in zip(prompts, gens):
        tokens, logprobs = naive_generate(model, prompt, GREEDY.max_new_tokens, tokenizer.eos_token_id)
        assert g.response_ids == tokens
        assert g.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert g.finish_reason == "length" and len(g.response_ids) == GREEDY.max_new_tokens
        assert g.response_text == tokenizer.decode(tokens)
    assert any(len(set(g.response_ids)) > 2 for g in gens)  # the fixture model gives the comparison teeth
    assert engine.generate(prompts, GREEDY) == gens  # deterministic


def test_batching_does_not_change_greedy_results(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer, max_batch=2)  # 3 prompts → batches of 2 and 1
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    together = engine.generate(prompts, GREEDY)
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_stops_at_eos_and_keeps_it_last(model, tokenizer, prompts):
    # The random model does not pick <eos> on these prompts, so make one of the tokens it does pick the EOS: the
    # first new token of prompt 0's greedy answer at position ≥ 1, so the stop comes mid-answer.
    first, _ = naive_generate(model, prompts[0], GREEDY.max_new_tokens, eos=-1)
    stop_at = next(k for k in range(1, len(first)) if first[k] not in first[:k])
    eos_tok = copy.deepcopy(tokenizer)
    eos_tok.eos_token = tokenizer.convert_ids_to_tokens(first[stop_at])
    eos = eos_tok.eos_token_id
    assert eos == first[stop_at]

    gens = HFInferenceEngine(model, eos_tok).generate(prompts, GREEDY)
    assert gens[0].response_ids == first[: stop_at + 1]
    assert gens[0].finish_reason == "eos"
    assert gens[0].response_text == tokenizer.decode(first[:stop_at])  # the EOS itself is not text
    for prompt, g in zip(prompts, gens):  # rows that stopped early must not disturb the others
        tokens, logprobs = naive_generate(model, prompt, GREEDY.max_new_tokens, eos)
        assert g.response_ids == tokens
        assert g.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert g.finish_reason == ("eos" if tokens[-1] == eos else "length")
        assert len(g.versions) == len(g.response_ids)
        assert eos not in g.response_ids[:-1]
    assert {g.finish_reason for g in gens} == {"eos", "length"}  # both kinds of stop in one batch


def test_versions_follow_the_loaded_weights(model, tokenizer, prompts):
    engine = HFInferenceEngine(model, tokenizer)
    assert all(g.versions == [0] * len(g.response_ids) for g in engine.generate(prompts, GREEDY))
    engine.load_weights(VersionedWeights.pack(3, model.state_dict()))
    assert engine.version == 3
    assert all(g.versions == [3] * len(g.response_ids) for g in engine.generate(prompts, GREEDY))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.3, 0.05, 0.5, 0.15]])
    logits = probs.log()
    original = logits.clone()
    # sorted probabilities 0.5, 0.3, 0.15, 0.05 have mass before them 0, 0.5, 0.8, 0.95; a token is kept while the
    # mass before it is below top_p
    expected_kept = {
        0.4: [[False, True, False, False], [False, False, True, False]],  # 0.5 alone reaches 0.4
        0.7: [[False, True, False, True], [True, False, True, False]],  # 0.5 + 0.3
        0.9: [[True, True, False, True], [True, False, True, True]],  # 0.5 + 0.3 + 0.15
    }
    for top_p, kept in expected_kept.items():
        out = top_p_filter(logits, top_p)
        kept = torch.tensor(kept)
        assert torch.equal(torch.isfinite(out), kept), top_p
        assert torch.equal(out[kept], logits[kept])  # kept tokens keep their logits
        assert (out[~kept] == float("-inf")).all()
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(logits, original)  # the input is not modified


SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6)


def test_sampling_is_reproducible_with_a_seed(model, tokenizer, prompts):
    a = HFInferenceEngine(model, tokenizer, seed=7).generate(prompts, SAMPLED)
    b_engine = HFInferenceEngine(model, tokenizer, seed=7)
    assert b_engine.generate(prompts, SAMPLED) == a
    assert b_engine.generate(prompts, SAMPLED) != a  # the generator moves on between calls
    assert HFInferenceEngine(model, tokenizer, seed=8).generate(prompts, SAMPLED) != a


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_engine_logprobs_match_the_trainers(model, tokenizer, prompts, params):
    gens = HFInferenceEngine(model, tokenizer, seed=1).generate(prompts, params)
    batch = collate(prompts, [g.response_ids for g in gens], tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logprobs(model, batch, temperature=params.temperature)  # (B, T)
    for i, g in enumerate(gens):
        start = len(prompts[i])
        trainer = logp[i, start : start + len(g.response_ids)]
        # logprobs of the temperature-scaled distribution before top-p truncation, as the trainer scores them
        assert g.logprobs == pytest.approx(trainer.tolist(), abs=1e-4)
