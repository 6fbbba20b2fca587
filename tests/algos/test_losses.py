import math
import re

import pytest
import torch

from rollflow.algos import CORRECTIONS, needs_proximal
from rollflow.algos import AGGREGATIONS, POLICY_LOSSES, Registry, policy_loss_fn, sft_loss
from rollflow.algos.losses import ppo_clip, seq_mean_token_mean, seq_mean_token_sum, token_mean
from rollflow.api import LossOutput, TrainBatch

# Five tokens, one per case of the clipped surrogate (ε_low = ε_high = 0.2):
#   ratio  A   r·A   clip(r)·A      -min(...)  clipped?
#   1.1   +1   1.1   1.1·1 = 1.1     -1.1      no  (inside [0.8, 1.2])
#   1.5   +2   3.0   1.2·2 = 2.4     -2.4      yes (above 1+ε, A > 0: the gain is capped)
#   0.5   -1  -0.5   0.8·-1 = -0.8    0.8      yes (below 1-ε, A < 0: the gain is capped)
#   1.5   -1  -1.5   1.2·-1 = -1.2    1.5      no  (pessimistic: the unclipped loss is worse)
#   0.5   +1   0.5   0.8·1 = 0.8     -0.5      no  (pessimistic again)
RATIOS = [1.1, 1.5, 0.5, 1.5, 0.5]
ADVANTAGES = [1.0, 2.0, -1.0, -1.0, 1.0]
EXPECTED_LOSS = [-1.1, -2.4, 0.8, 1.5, -0.5]
EXPECTED_CLIPPED = [0.0, 1.0, 1.0, 0.0, 0.0]


def ratio_inputs(ratios, old=-1.3):
    old_logprobs = torch.full((1, len(ratios)), old)
    return old_logprobs + torch.log(torch.tensor([ratios])), old_logprobs


def test_ppo_clip_per_token_loss_hand_computed():
    logprobs, old = ratio_inputs(RATIOS)
    out = ppo_clip(logprobs, old, torch.tensor([ADVANTAGES]))
    assert torch.allclose(out.per_token, torch.tensor([EXPECTED_LOSS]), atol=1e-5)
    assert torch.equal(out.metrics["clip_frac"], torch.tensor([EXPECTED_CLIPPED]))
    assert torch.allclose(out.metrics["ratio"], torch.tensor([RATIOS]), atol=1e-5)


def test_ppo_clip_low_and_high_are_separate():
    logprobs, old = ratio_inputs([1.5, 0.5])
    out = ppo_clip(logprobs, old, torch.tensor([[2.0, -1.0]]), clip_low=0.1, clip_high=0.28)
    # 1.5 → clipped to 1.28: -(1.28·2) = -2.56;  0.5 → clipped to 0.9: -(0.9·-1) = 0.9
    assert torch.allclose(out.per_token, torch.tensor([[-2.56, 0.9]]), atol=1e-5)


# (B=2, T=4); the padded positions hold 100 so any leak through the mask is obvious.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 100.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("token-mean", 11 / 4),  # (1 + 2 + 3 + 5) / 4 tokens
        ("seq-mean-token-mean", 3.5),  # mean(6/3, 5/1) = mean(2, 5)
        ("seq-mean-token-sum", 5.5),  # mean(1+2+3, 5) = mean(6, 5)
    ],
)
def test_aggregations_hand_computed(name, expected):
    assert AGGREGATIONS.get(name)(PER_TOKEN, MASK).item() == pytest.approx(expected)


def test_seq_mean_token_mean_skips_fully_masked_rows():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert seq_mean_token_mean(PER_TOKEN, mask).item() == pytest.approx(2.0)  # only row 0: 6 / 3


@pytest.mark.parametrize("aggregate", [token_mean, seq_mean_token_mean, seq_mean_token_sum])
def test_all_masked_minibatch_aggregates_to_zero_not_nan(aggregate):
    # A minibatch made only of masked (e.g. infra_error) rows must not poison the step with nan.
    per_token = PER_TOKEN.clone().requires_grad_()
    value = aggregate(per_token, torch.zeros_like(MASK))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(per_token.grad, torch.zeros_like(PER_TOKEN))


def make_batch(old_logprobs, advantages, response_mask):
    old = torch.tensor([old_logprobs])
    B, T = old.shape
    return TrainBatch(
        input_ids=torch.zeros((B, T), dtype=torch.long),
        attention_mask=torch.ones((B, T), dtype=torch.long),
        response_mask=torch.tensor([response_mask]),
        old_logprobs=old,
        behav_logprobs=old.clone(),
        advantages=torch.tensor([advantages]),
        versions=torch.zeros((B, T), dtype=torch.long),
    )


def test_policy_loss_value_gradient_sign_and_metrics_on_policy():
    # Position 0 is prompt (masked); tokens 1 and 2 are the response with advantages +2 and -1.
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0])
    logprobs = batch.old_logprobs.clone().requires_grad_()  # on-policy: ratio = 1 everywhere
    entropy = torch.tensor([[9.0, 1.0, 3.0]])
    out = policy_loss_fn("ppo_clip", "token-mean")(logprobs, entropy, batch)

    assert isinstance(out, LossOutput)
    # ratio 1 → per-token loss -A = (-2, +1); token-mean over 2 tokens = -0.5
    assert out.loss.item() == pytest.approx(-0.5)
    out.loss.backward()
    # d loss / d logprob_t = -A_t · ratio / 2 tokens = (0 masked, -1, +0.5)
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -1.0, 0.5]]))
    assert logprobs.grad[0, 1] < 0  # gradient descent raises the log-prob of the positive-advantage token
    assert out.metrics["kl_old"] == 0.0
    assert out.metrics["clip_frac"] == 0.0
    assert out.metrics["ratio"] == pytest.approx(1.0)
    assert out.metrics["entropy"] == pytest.approx(2.0)  # masked mean of (1, 3)


def test_policy_loss_entropy_bonus_and_kl_metric():
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0])
    # token 1 drifts to ratio 1.1 (inside the clip range), token 2 stays on-policy
    logprobs = batch.old_logprobs + torch.tensor([[0.0, math.log(1.1), 0.0]])
    out = policy_loss_fn("ppo_clip", "token-mean", entropy_coef=0.1)(logprobs, torch.tensor([[9.0, 1.0, 3.0]]), batch)
    # per-token (-1.1·2, +1) → mean -0.6; minus 0.1 · entropy mean 2 → -0.8
    assert out.loss.item() == pytest.approx(-0.8, abs=1e-6)
    # k3 on token 1: 1.1 - 1 - ln 1.1 = 0.0046898; token 2: 0 → mean 0.0023449
    assert out.metrics["kl_old"] == pytest.approx((1.1 - 1 - math.log(1.1)) / 2, abs=1e-6)


def test_policy_loss_fn_passes_clip_params_through():
    batch = make_batch([0.0, -1.0], [0.0, 2.0], [0.0, 1.0])
    logprobs = batch.old_logprobs + torch.tensor([[0.0, math.log(1.5)]])
    out = policy_loss_fn("ppo_clip", "token-mean", clip_low=0.2, clip_high=0.28)(logprobs, torch.zeros(1, 2), batch)
    assert out.loss.item() == pytest.approx(-2.56, abs=1e-5)  # -(1.28 · 2)
    assert out.metrics["clip_frac"] == 1.0


def test_sft_loss_is_token_mean_nll_of_the_response():
    batch = make_batch([0.0] * 4, [0.0] * 4, [0.0, 0.0, 1.0, 1.0])
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -3.0]], requires_grad=True)
    out = sft_loss(logprobs, torch.tensor([[0.0, 0.0, 0.5, 1.5]]), batch)
    assert out.loss.item() == pytest.approx(2.5)  # -(-2 - 3) / 2
    assert out.metrics["entropy"] == pytest.approx(1.0)
    out.loss.backward()
    assert torch.equal(logprobs.grad, torch.tensor([[0.0, 0.0, -0.5, -0.5]]))


def test_unknown_name_suggests_the_close_one():
    expected = "unknown name 'ppo_clp' among policy losses; registered: ppo_clip. Did you mean 'ppo_clip'?"
    with pytest.raises(KeyError, match=re.escape(expected)):
        POLICY_LOSSES.get("ppo_clp")
    with pytest.raises(KeyError, match=r"Did you mean 'token-mean'\?"):
        AGGREGATIONS.get("token_mean")
    with pytest.raises(KeyError) as info:
        POLICY_LOSSES.get("zzz")
    assert "Did you mean" not in str(info.value)


def test_describe_returns_first_docstring_lines():
    assert set(AGGREGATIONS.describe()) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum"}
    assert POLICY_LOSSES.describe()["ppo_clip"].startswith("PPO clipped surrogate:")
    for registry in (POLICY_LOSSES, AGGREGATIONS):
        for name, doc in registry.describe().items():
            assert doc and "\n" not in doc, name


def test_registry_rejects_duplicates_and_keeps_undocumented_functions():
    reg = Registry("test things")

    @reg.register("a")
    def a():
        """First line.

        More detail that describe() leaves out."""

    reg.register("b")(lambda: None)
    with pytest.raises(ValueError, match="'a' is registered twice among test things"):
        reg.register("a")(lambda: None)
    assert reg.get("a") is a
    assert reg.describe() == {"a": "First line.", "b": ""}


def test_truncated_is_weights_tokens_by_capped_ratio_to_the_behaviour_policy():
    # π_old/π_behav per token: 0.5, 1.5, 4 → weights 0.5, 1.5, 2 (cap 2); the loss scales by them.
    batch = make_batch([0.0, -1.0, -1.0, -1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    batch.behav_logprobs = batch.old_logprobs - torch.log(torch.tensor([[1.0, 0.5, 1.5, 4.0]]))
    weights = CORRECTIONS.get("tis")(batch.old_logprobs, batch.behav_logprobs, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.0, 0.5, 1.5, 2.0]]))
    logprobs = batch.old_logprobs.clone().requires_grad_()
    plain = policy_loss_fn("ppo_clip", "token-mean")(logprobs, torch.zeros_like(logprobs), batch)
    tis = policy_loss_fn("ppo_clip", "token-mean", correction="tis", correction_params={"cap": 2.0})(logprobs, torch.zeros_like(logprobs), batch)
    assert plain.loss.item() == pytest.approx(-1.0)  # on-policy ratio 1, advantage 1 on 3 tokens
    assert tis.loss.item() == pytest.approx(-(0.5 + 1.5 + 2.0) / 3)
    assert tis.metrics["is_weight"] == pytest.approx(4.0 / 3)
    assert not needs_proximal("none") and needs_proximal("tis")
    assert torch.equal(CORRECTIONS.get("none")(batch.old_logprobs, batch.behav_logprobs), torch.ones_like(batch.old_logprobs))
