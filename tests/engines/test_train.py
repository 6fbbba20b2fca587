import pytest
import torch

from rollflow.algos import sft_loss
from rollflow.algos.batch import collate
from rollflow.api import LossOutput
from rollflow.engines.torch_train import TorchTrainEngine, token_logprobs


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def sft_batch(tokenizer, pairs):
    prompts = [[tokenizer.bos_token_id, *encode(tokenizer, p)] for p, _ in pairs]
    targets = [[*encode(tokenizer, t), tokenizer.eos_token_id] for _, t in pairs]
    return collate(prompts, targets, tokenizer.pad_token_id)


PAIRS = [("1+2=", "3"), ("12+1=", "31"), ("5+5=", "01"), ("9+0=", "9")]


def test_minibatches_times_epochs_optimizer_updates_one_version(tokenizer, make_model):
    engine = TorchTrainEngine(make_model(), lr=1e-3)
    steps, seen = [], []
    engine.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))

    def loss_fn(logprobs, entropy, batch):
        seen.append(batch.input_ids)
        out = sft_loss(logprobs, entropy, batch)
        return LossOutput(out.loss, {"rows": float(len(batch))})

    before = [p.detach().clone() for p in engine.model.parameters()]
    metrics = engine.train_step(sft_batch(tokenizer, PAIRS), loss_fn, minibatches=2, epochs=2)

    assert len(steps) == 4 and len(seen) == 4
    assert engine.version == 1
    assert metrics["rows"] == 2.0  # every minibatch holds 4 / 2 rows; metrics are averaged over updates
    assert {"loss", "grad_norm"} <= set(metrics)
    full = sft_batch(tokenizer, PAIRS).input_ids
    for epoch in (seen[:2], seen[2:]):  # each epoch covers every row exactly once
        rows = sorted(map(tuple, torch.cat(epoch).tolist()))
        assert rows == sorted(map(tuple, full.tolist()))
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.export_weights().version == 1


def test_more_minibatches_than_samples_is_an_error(tokenizer, make_model):
    engine = TorchTrainEngine(make_model(), lr=1e-3)
    with pytest.raises(ValueError, match="cannot cut 2 samples into 3 minibatches; lower minibatches_per_step"):
        engine.train_step(sft_batch(tokenizer, PAIRS[:2]), sft_loss, minibatches=3)
    assert engine.version == 0


def test_token_logprobs_convention(tokenizer, make_model):
    model = make_model()
    batch = sft_batch(tokenizer, PAIRS[:2])
    logp, entropy = token_logprobs(model, batch)  # (B, T)
    assert logp.shape == entropy.shape == batch.input_ids.shape
    assert torch.equal(logp[:, 0], torch.zeros(2))  # position 0 has no prediction
    with torch.no_grad():
        full = model(batch.input_ids[:1, :4], use_cache=False).logits.log_softmax(-1)  # row 0's first 4 tokens, no padding
    assert logp[0, 3].item() == pytest.approx(full[0, 2, batch.input_ids[0, 3]].item(), abs=1e-5)
    assert (entropy[:, 1:] > 0).all() and (entropy <= torch.log(torch.tensor(float(len(tokenizer)))) + 1e-5).all()


def test_sft_loss_decreases_on_a_repeated_example(tokenizer, make_model):
    engine = TorchTrainEngine(make_model(), lr=1e-2)
    batch = sft_batch(tokenizer, [("12+34=", "64")] * 4)
    losses = [engine.train_step(batch, sft_loss)["loss"] for _ in range(30)]
    assert engine.version == 30
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < min(losses[:5])


def test_updates_per_step_when_minibatches_do_not_divide_the_batch(tokenizer, make_model):
    engine = TorchTrainEngine(make_model(), lr=1e-3)
    steps = []
    engine.optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    engine.train_step(sft_batch(tokenizer, PAIRS + PAIRS[:2]), sft_loss, minibatches=4, epochs=1)
    assert len(steps) == 4


def test_lr_scale_scales_this_steps_update_only(tokenizer, make_model):
    batch = sft_batch(tokenizer, PAIRS)
    moves = {}
    for scale in (1.0, 0.25, 0.0):
        engine = TorchTrainEngine(make_model(), lr=1e-3)
        before = torch.cat([p.detach().flatten().clone() for p in engine.model.parameters()])
        engine.train_step(batch, sft_loss, lr_scale=scale)
        after = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
        moves[scale] = (after - before).abs()
        assert engine.optimizer.param_groups[0]["lr"] == 1e-3  # restored for the next step
    assert moves[0.0].max() == 0  # the weights did not move at all
    # AdamW's first update is lr × g / (|g| + eps) per weight: a quarter of the lr, a quarter of the move
    assert torch.allclose(moves[0.25], moves[1.0] / 4, atol=1e-7)  # float32 rounding of p + Δ
    assert moves[1.0].max() == pytest.approx(1e-3, rel=1e-3)
