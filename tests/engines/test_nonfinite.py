"""A minibatch whose loss or gradient is NaN/Inf is skipped: no optimizer step, weights and AdamW state untouched."""

import math

import pytest
import torch

from rollflow.algos import sft_loss
from rollflow.algos.batch import collate
from rollflow.api import LossOutput
from rollflow.engines.torch_train import TorchTrainEngine

PAIRS = [("1+2=", "3"), ("12+1=", "31"), ("5+5=", "01"), ("9+0=", "9")]


def sft_batch(tokenizer, pairs):
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p, _ in pairs]
    targets = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for _, t in pairs]
    return collate(prompts, targets, tokenizer.pad_token_id)


def params(engine):
    return [p.detach().clone() for p in engine.model.parameters()]


def adam_state(engine):
    """Per parameter: (step, exp_avg, exp_avg_sq), copied."""
    return [tuple(s[k].clone() if torch.is_tensor(s[k]) else s[k] for k in ("step", "exp_avg", "exp_avg_sq"))
            for s in (engine.optimizer.state[p] for p in engine.model.parameters())]


def poisoned(bad_calls, how="loss", seen=None):
    """sft_loss, made non-finite on the given 1-based calls: its value NaN ("loss") or only its gradient ("grad")."""
    calls = iter(range(1, 10**6))

    def loss_fn(logprobs, entropy, batch):
        out = sft_loss(logprobs, entropy, batch)
        n = next(calls)
        if seen is not None:
            seen.append((n, batch))
        if n in bad_calls:
            # "grad": sqrt'(0) = inf, times a zero inner gradient, is NaN while the value stays finite.
            bad = out.loss * math.nan if how == "loss" else out.loss + torch.sqrt((logprobs * 0).sum())
            return LossOutput(bad, {"rows": float(len(batch))})
        return LossOutput(out.loss, {"rows": float(len(batch))})

    return loss_fn


def test_finite_updates_report_zero_skipped(tokenizer, make_model):
    engine = TorchTrainEngine(make_model(), lr=1e-3)
    metrics = engine.train_step(sft_batch(tokenizer, PAIRS), poisoned(()), minibatches=2)
    assert metrics["nonfinite_updates"] == 0.0
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_a_step_where_every_update_is_non_finite_changes_nothing(tokenizer, make_model, how):
    engine = TorchTrainEngine(make_model(), lr=1e-2)
    batch = sft_batch(tokenizer, PAIRS)
    engine.train_step(batch, sft_loss)  # AdamW has moments to pollute
    weights, state = params(engine), adam_state(engine)
    steps = []
    engine.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))

    metrics = engine.train_step(batch, poisoned({1, 2, 3, 4}, how), minibatches=2, epochs=2)

    assert steps == []
    assert metrics["nonfinite_updates"] == 4.0
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"]) and math.isnan(metrics["rows"])
    assert all(torch.equal(a, b) for a, b in zip(weights, engine.model.parameters()))
    for before, after in zip(state, adam_state(engine)):
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in engine.model.parameters())  # nothing left to leak into the next step


def test_a_skipped_update_leaves_the_step_as_if_only_the_finite_ones_ran(tokenizer, make_model):
    """Engine A's second minibatch is NaN; engine B trains on A's first minibatch alone: both end identical."""
    a, b = TorchTrainEngine(make_model(seed=1), lr=1e-2), TorchTrainEngine(make_model(seed=1), lr=1e-2)
    batch = sft_batch(tokenizer, PAIRS)
    for engine in (a, b):
        engine.train_step(batch, sft_loss)
    seen = []

    metrics = a.train_step(batch, poisoned({2}, seen=seen), minibatches=2)

    assert metrics["nonfinite_updates"] == 1.0
    assert metrics["rows"] == 2.0  # averaged over the applied update only
    b_metrics = b.train_step(seen[0][1], sft_loss)
    assert metrics["loss"] == pytest.approx(b_metrics["loss"], rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(b_metrics["grad_norm"], rel=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    for sa, sb in zip(adam_state(a), adam_state(b)):
        assert int(sa[0]) == int(sb[0]) == 2  # the skipped update did not count as an AdamW step
        torch.testing.assert_close(sa[1], sb[1], rtol=0, atol=0)
        torch.testing.assert_close(sa[2], sb[2], rtol=0, atol=0)
