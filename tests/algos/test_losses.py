import math
import re

import pytest
import torch

from rollflow.algos import ADVANTAGES as ADVANTAGE_ESTIMATORS
from rollflow.algos import (
    AGGREGATIONS,
    CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    Registry,
    needs_proximal,
    policy_loss_fn,
    sft_loss,
)
from rollflow.algos.losses import (
    gspo,
    ppo_clip,
    reinforce,
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
    value_loss,
    value_loss_fn,
)
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
    out = ppo_clip(logprobs, old, torch.tensor([ADVANTAGES]), torch.ones(1, 5))
    assert torch.allclose(out.per_token, torch.tensor([EXPECTED_LOSS]), atol=1e-5)
    assert torch.equal(out.metrics["clip_frac"], torch.tensor([EXPECTED_CLIPPED]))
    assert torch.allclose(out.metrics["ratio"], torch.tensor([RATIOS]), atol=1e-5)


def test_ppo_clip_low_and_high_are_separate():
    logprobs, old = ratio_inputs([1.5, 0.5])
    out = ppo_clip(logprobs, old, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), clip_low=0.1, clip_high=0.28)
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
        ("seq-mean-token-sum-norm", 1.375),  # (6 + 5) / (2 sequences · T = 4)
    ],
)
def test_aggregations_hand_computed(name, expected):
    assert AGGREGATIONS.get(name)(PER_TOKEN, MASK).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("token-mean", 11 / 4),  # norm is ignored by the others
        ("seq-mean-token-mean", 3.5),
        ("seq-mean-token-sum", 5.5),
        ("seq-mean-token-sum-norm", 0.55),  # (6 + 5) / (2 sequences · norm 10)
    ],
)
def test_aggregations_take_a_constant_norm(name, expected):
    assert AGGREGATIONS.get(name)(PER_TOKEN, MASK, norm=10).item() == pytest.approx(expected)


def test_seq_mean_token_sum_norm_counts_only_sequences_with_tokens():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert seq_mean_token_sum_norm(PER_TOKEN, mask).item() == pytest.approx(1.5)  # 6 / (1 sequence · T = 4)


def test_seq_mean_token_mean_skips_fully_masked_rows():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert seq_mean_token_mean(PER_TOKEN, mask).item() == pytest.approx(2.0)  # only row 0: 6 / 3


@pytest.mark.parametrize("aggregate", [token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm])
def test_all_masked_minibatch_aggregates_to_zero_not_nan(aggregate):
    # A minibatch made only of masked (e.g. infra_error) rows must not poison the step with nan.
    per_token = PER_TOKEN.clone().requires_grad_()
    value = aggregate(per_token, torch.zeros_like(MASK))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(per_token.grad, torch.zeros_like(PER_TOKEN))


def make_batch(old_logprobs, advantages, response_mask, **columns):
    """One row; ``columns`` are further TrainBatch columns (ref_logprobs, values, returns) as lists."""
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
        **{k: torch.tensor([v]) for k, v in columns.items()},
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
    expected = (
        "unknown name 'ppo_clp' among policy losses; registered: gspo, ppo_clip, reinforce. Did you mean 'ppo_clip'?"
    )
    with pytest.raises(KeyError, match=re.escape(expected)):
        POLICY_LOSSES.get("ppo_clp")
    with pytest.raises(KeyError, match=r"Did you mean 'token-mean'\?"):
        AGGREGATIONS.get("token_mean")
    with pytest.raises(KeyError) as info:
        POLICY_LOSSES.get("zzz")
    assert "Did you mean" not in str(info.value)


def test_describe_returns_first_docstring_lines():
    expected = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"}
    assert set(AGGREGATIONS.describe()) == expected
    assert POLICY_LOSSES.describe()["ppo_clip"].startswith("PPO clipped surrogate:")
    for registry in (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS):
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
    weights = CORRECTIONS.get("tis")(batch.old_logprobs, batch.old_logprobs, batch.behav_logprobs, batch.response_mask)
    assert torch.allclose(weights, torch.tensor([[1.0, 0.5, 1.5, 2.0]]))
    logprobs = batch.old_logprobs.clone().requires_grad_()
    plain = policy_loss_fn("ppo_clip", "token-mean")(logprobs, torch.zeros_like(logprobs), batch)
    tis = policy_loss_fn("ppo_clip", "token-mean", correction="tis", correction_params={"cap": 2.0})(logprobs, torch.zeros_like(logprobs), batch)
    assert plain.loss.item() == pytest.approx(-1.0)  # on-policy ratio 1, advantage 1 on 3 tokens
    assert tis.loss.item() == pytest.approx(-(0.5 + 1.5 + 2.0) / 3)
    assert tis.metrics["is_weight"] == pytest.approx(4.0 / 3)
    assert not needs_proximal("none") and needs_proximal("tis")
    none = CORRECTIONS.get("none")(batch.old_logprobs, batch.old_logprobs, batch.behav_logprobs, batch.response_mask)
    assert torch.equal(none, torch.ones_like(batch.old_logprobs))


# --- GSPO ----------------------------------------------------------------------------------------------------------
# (B=2, T=4), π_old = e^-1 everywhere; log π − log π_old per token, 5.0 on prompt/padding where nothing may leak:
#   row 0: mask (0, 1, 1, 1), log-ratios (5, 0.1, -0.2, 0.4) → mean 0.3 / 3 = 0.1 → s_0 = e^0.1 = 1.105171
#   row 1: mask (0, 1, 1, 0), log-ratios (5, 0.3, 0.5, 5)    → mean 0.8 / 2 = 0.4 → s_1 = e^0.4 = 1.491825
GSPO_MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
GSPO_OLD = torch.full((2, 4), -1.0)
GSPO_LOGPROBS = GSPO_OLD + torch.tensor([[5.0, 0.1, -0.2, 0.4], [5.0, 0.3, 0.5, 5.0]])
S0, S1 = math.exp(0.1), math.exp(0.4)


def test_gspo_clips_whole_sequences_hand_computed():
    advantages = torch.tensor([[0.0, 1.0, -0.5, 2.0], [0.0, 2.0, 2.0, 0.0]])
    out = gspo(GSPO_LOGPROBS, GSPO_OLD, advantages, GSPO_MASK)
    # row 0: s_0 inside [0.8, 1.2], loss -s_0·A per token: (-1.105171, +0.552585, -2.210342)
    # row 1: s_1 above 1.2 with A = 2 > 0: capped at -(1.2·2) = -2.4 on both tokens
    on = GSPO_MASK.bool()
    assert torch.allclose(out.per_token[on], torch.tensor([-S0, 0.5 * S0, -2 * S0, -2.4, -2.4]), atol=1e-5)
    assert torch.equal(out.metrics["clip_frac"][on], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(out.metrics["ratio"][on], torch.tensor([S0, S0, S0, S1, S1]), atol=1e-5)


def test_gspo_token_gradient_is_the_sequence_ratio_times_the_advantage():
    logprobs = GSPO_LOGPROBS.clone().requires_grad_()
    advantages = torch.tensor([[0.0, 1.0, -0.5, 2.0], [0.0, 2.0, 2.0, 0.0]])
    (gspo(logprobs, GSPO_OLD, advantages, GSPO_MASK).per_token * GSPO_MASK).sum().backward()
    # row 0 unclipped: d/d log π_t = -s_0·A_t, each token with its own advantage; row 1 clipped: no gradient
    expected = torch.tensor([[0.0, -S0, 0.5 * S0, -2 * S0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-5)


def test_gspo_with_seq_mean_token_mean_is_sequence_level_gspo():
    # GSPO's objective -s_i(θ)·A_i with s_i = exp(mean_t log π/π_old) has gradient -s_i·A_i/|y_i| per token.
    batch = make_batch(GSPO_OLD[0].tolist(), [0.0, 1.5, 1.5, 1.5], GSPO_MASK[0].tolist())
    logprobs = GSPO_LOGPROBS[:1].clone().requires_grad_()
    out = policy_loss_fn("gspo", "seq-mean-token-mean")(logprobs, torch.zeros(1, 4), batch)
    assert out.loss.item() == pytest.approx(-1.5 * S0, abs=1e-5)
    out.loss.backward()
    sequence_level = logprobs.detach().clone().requires_grad_()
    (-((sequence_level - batch.old_logprobs)[:, 1:].mean().exp()) * 1.5).backward()
    assert torch.allclose(logprobs.grad, sequence_level.grad, atol=1e-6)
    # -s_0 · 1.5 / 3 tokens on each
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5 * S0, -0.5 * S0, -0.5 * S0]]), atol=1e-5)


def test_gspo_row_without_response_tokens_has_ratio_one():
    out = gspo(GSPO_LOGPROBS, GSPO_OLD, torch.ones(2, 4), torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.isfinite(out.per_token).all()
    assert torch.allclose(out.metrics["ratio"][1], torch.ones(4))


# --- REINFORCE -----------------------------------------------------------------------------------------------------


def test_reinforce_is_minus_advantage_times_grad_log_prob_without_clip():
    logprobs, old = ratio_inputs([2.0, 1.5, 0.5])
    logprobs.requires_grad_()
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    out = reinforce(logprobs, old, advantages, torch.ones(1, 3), clip_low=0.1, clip_high=0.28)  # clip params ignored
    assert torch.allclose(out.per_token, torch.tensor([[-1.0, 2.0, -0.5]]))  # -A in value, whatever the ratio
    assert torch.allclose(out.metrics["ratio"], torch.tensor([[2.0, 1.5, 0.5]]), atol=1e-6)
    out.per_token.sum().backward()
    assert torch.allclose(logprobs.grad, -advantages)  # ratio 2 with A > 0 would be clipped by PPO: not here


@pytest.mark.parametrize("loss", ["ppo_clip", "gspo", "reinforce"])
def test_every_loss_takes_the_recipes_call_form_and_agrees_on_policy(loss):
    # recipes/grpo.py: policy_loss_fn(a.loss, a.aggregation, a.entropy_coef, correction=..., correction_params=...,
    # clip_low=..., clip_high=...). On-policy every ratio is 1, so all three are -A in value and -A·∇log π in gradient.
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0])
    logprobs = batch.old_logprobs.clone().requires_grad_()
    fn = policy_loss_fn(
        loss, "token-mean", 0.0, correction="tis", correction_params={"cap": 2.0}, clip_low=0.2, clip_high=0.28
    )
    out = fn(logprobs, torch.zeros(1, 3), batch)
    assert out.loss.item() == pytest.approx(-0.5)  # mean(-2, +1)
    out.loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -1.0, 0.5]]))


# --- policy_loss_fn: corrections, KL to the reference, norm --------------------------------------------------------


def test_aipo_takes_the_ratio_to_the_current_policy_and_weighs_by_capped_pi_over_mu():
    # π/μ per response token: 0.5, 1.5, 3 → weights 0.5, 1.5, 2 (ρ = 2). The recorded π_old is 3× below π: PPO's
    # ratio 3 would clip every positive-advantage token, AIPO's ratio is 1 and never clips.
    batch = make_batch([0.0, -1.0, -1.0, -1.0], [0.0, 1.0, 2.0, -1.0], [0.0, 1.0, 1.0, 1.0])
    logprobs = batch.old_logprobs.clone().requires_grad_()
    batch.old_logprobs = batch.old_logprobs - math.log(3.0)
    batch.behav_logprobs = logprobs.detach() - torch.log(torch.tensor([[1.0, 0.5, 1.5, 3.0]]))
    fn = policy_loss_fn("ppo_clip", "token-mean", correction="aipo", correction_params={"rho": 2.0})
    out = fn(logprobs, torch.zeros(1, 4), batch)
    # per token -w·A = (-0.5·1, -1.5·2, -2·-1) = (-0.5, -3, 2); token-mean -1.5 / 3 = -0.5
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-6)
    out.loss.backward()
    # gradient -min(π/μ, ρ)·A / 3 tokens
    assert torch.allclose(logprobs.grad, torch.tensor([[0.0, -0.5 / 3, -1.0, 2.0 / 3]]), atol=1e-6)
    assert out.metrics["clip_frac"] == 0.0 and out.metrics["ratio"] == pytest.approx(1.0)
    assert out.metrics["is_weight"] == pytest.approx(4.0 / 3)
    assert out.metrics["kl_old"] == pytest.approx(3 - 1 - math.log(3), abs=1e-5)  # drift from the recorded π_old


def test_decoupled_drops_tokens_and_reports_the_share():
    # recomputed π_old = π (on-policy within the step); π_old/μ = 0.5, 1.5, 6 → weights 0.5, 1.5, 0 (6 > cap 5)
    batch = make_batch([0.0, -1.0, -1.0, -1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    batch.behav_logprobs = batch.old_logprobs - torch.log(torch.tensor([[1.0, 0.5, 1.5, 6.0]]))
    fn = policy_loss_fn("ppo_clip", "token-mean", correction="decoupled")
    out = fn(batch.old_logprobs.clone(), torch.zeros(1, 4), batch)
    assert out.loss.item() == pytest.approx(-2.0 / 3)  # -(0.5 + 1.5 + 0) / 3
    assert out.metrics["is_dropped"] == pytest.approx(1.0 / 3)
    assert out.metrics["is_weight"] == pytest.approx(2.0 / 3)


LN2 = math.log(2.0)


@pytest.mark.parametrize(
    "estimator, expected_loss, expected_grad",
    [
        # k3 on token 1 (ref − log π = ln 2): 2 − ln 2 − 1 = 0.306853, token 2: 0 → token-mean 0.153426
        #   loss -0.5 + 0.1·0.153426; d k3 / d log π = 1 − e^(ref − log π) = -1 → token 1: -1 + 0.1·(-1)/2 = -1.05
        ("k3", -0.5 + 0.1 * (1 - LN2) / 2, [0.0, -1.05, 0.5]),
        # k1 = log π − ref = (-ln 2, 0) → token-mean -ln 2 / 2; d k1 / d log π = 1 → +0.1/2 on each token
        ("k1", -0.5 - 0.1 * LN2 / 2, [0.0, -0.95, 0.55]),
    ],
)
def test_kl_to_the_reference_in_the_loss(estimator, expected_loss, expected_grad):
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0], ref_logprobs=[0.0, -1.0 + LN2, -2.0])
    logprobs = batch.old_logprobs.clone().requires_grad_()
    fn = policy_loss_fn("ppo_clip", "token-mean", kl_coef=0.1, kl_estimator=estimator)
    out = fn(logprobs, torch.zeros(1, 3), batch)
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-6)
    out.loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([expected_grad]), atol=1e-6)
    assert out.metrics["kl_ref"] == pytest.approx((1 - LN2) / 2, abs=1e-6)  # always k3, whatever the loss uses


def test_kl_ref_metric_without_kl_in_the_loss_and_missing_reference():
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0], ref_logprobs=[0.0, -1.0 + LN2, -2.0])
    out = policy_loss_fn("ppo_clip", "token-mean")(batch.old_logprobs.clone(), torch.zeros(1, 3), batch)
    assert out.loss.item() == pytest.approx(-0.5) and out.metrics["kl_ref"] == pytest.approx((1 - LN2) / 2, abs=1e-6)
    batch.ref_logprobs = None
    out = policy_loss_fn("ppo_clip", "token-mean")(batch.old_logprobs.clone(), torch.zeros(1, 3), batch)
    assert "kl_ref" not in out.metrics
    with pytest.raises(ValueError, match=r"algo.kl_coef > 0 in the loss needs reference log-probs: "):
        policy_loss_fn("ppo_clip", "token-mean", kl_coef=0.1)(batch.old_logprobs.clone(), torch.zeros(1, 3), batch)


def test_policy_loss_fn_passes_norm_to_the_aggregation():
    batch = make_batch([0.0, -1.0, -2.0], [0.0, 2.0, -1.0], [0.0, 1.0, 1.0])
    out = policy_loss_fn("ppo_clip", "seq-mean-token-sum-norm", entropy_coef=0.1, norm=4)(
        batch.old_logprobs.clone(), torch.tensor([[9.0, 1.0, 3.0]]), batch
    )
    # policy: (-2 + 1) / (1 sequence · 4) = -0.25; entropy: (1 + 3) / 4 = 1 → -0.25 - 0.1·1 = -0.35
    assert out.loss.item() == pytest.approx(-0.35)
    assert out.metrics["is_dropped"] == 0.0


# --- value loss ----------------------------------------------------------------------------------------------------
# clip 0.2, position 0 masked (garbage 100):
#   V    V_old  R     (V-R)²  V clipped            (Vc-R)²  ½·max   clip binds?
#   1.0  0.9    1.2   0.04    1.0 (moved 0.1)      0.04     0.02    no  (inside the clip)
#   1.5  1.0    1.0   0.25    1.2                  0.04     0.125   no  (the unclipped error is larger)
#   1.5  1.0    2.0   0.25    1.2                  0.64     0.32    yes (V jumped toward R past the clip)
#   0.0  0.5    0.0   0.0     0.3                  0.09     0.045   yes
VALUES = [100.0, 1.0, 1.5, 1.5, 0.0]
OLD_VALUES = [100.0, 0.9, 1.0, 1.0, 0.5]
RETURNS = [-100.0, 1.2, 1.0, 2.0, 0.0]
VALUE_MASK = [0.0, 1.0, 1.0, 1.0, 1.0]


def test_value_loss_clipped_and_unclipped_hand_computed():
    values = torch.tensor([VALUES], requires_grad=True)
    args = torch.tensor([OLD_VALUES]), torch.tensor([RETURNS]), torch.tensor([VALUE_MASK])
    clipped = value_loss(values, *args)
    assert torch.allclose(clipped, torch.tensor([[0.0, 0.02, 0.125, 0.32, 0.045]]), atol=1e-6)
    clipped.sum().backward()
    # d/dV = V − R where the unclipped error wins; 0 where the clip binds (the clamp is flat there)
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.2, 0.5, 0.0, 0.0]]), atol=1e-6)
    plain = value_loss(values, *args, clip=None)
    assert torch.allclose(plain, torch.tensor([[0.0, 0.02, 0.125, 0.125, 0.0]]), atol=1e-6)  # ½(V − R)²


def test_value_loss_fn_aggregates_and_reports():
    batch = make_batch([0.0] * 5, [0.0] * 5, VALUE_MASK, values=OLD_VALUES, returns=RETURNS)
    out = value_loss_fn()(torch.tensor([VALUES]), batch)
    assert out.loss.item() == pytest.approx((0.02 + 0.125 + 0.32 + 0.045) / 4)  # token-mean = 0.1275
    assert out.metrics == pytest.approx({"value_clip_frac": 0.5, "value_mean": 1.0, "return_mean": 1.05})
    assert value_loss_fn("seq-mean-token-sum")(torch.tensor([VALUES]), batch).loss.item() == pytest.approx(0.51)
    assert value_loss_fn(clip=None)(torch.tensor([VALUES]), batch).metrics["value_clip_frac"] == 0.0
    batch.returns = None
    with pytest.raises(ValueError, match=r"the value loss needs batch.returns: "):
        value_loss_fn()(torch.tensor([VALUES]), batch)
