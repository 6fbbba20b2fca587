import math

import pytest
import torch

from rollflow.algos import ADVANTAGES
from rollflow.algos.advantages import gae, grpo, reinforce_pp, rloo


def test_grpo_matches_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])  # (G=2, n=3)
    # row 0: mean 1/3, centred (2/3, -1/3, -1/3); unbiased var = (4/9 + 1/9 + 1/9) / (3-1) = 1/3, std = 1/√3
    #        → advantages (2/√3, -1/√3, -1/√3) = (1.1547, -0.5774, -0.5774)
    # row 1: mean 2, centred (-1, 0, 1); unbiased var = (1 + 0 + 1) / 2 = 1, std = 1 → (-1, 0, 1)
    s3 = math.sqrt(3)
    expected = torch.tensor([[2 / s3, -1 / s3, -1 / s3], [-1.0, 0.0, 1.0]])
    assert torch.allclose(grpo(rewards), expected, atol=1e-5)


def test_grpo_uses_the_unbiased_std():
    # Population std of (1, 2, 3) is √(2/3) = 0.8165, which would give 1 / 0.8165 = 1.2247 for the last sample.
    adv = grpo(torch.tensor([[1.0, 2.0, 3.0]]))
    assert adv[0, 2].item() == pytest.approx(1.0, abs=1e-5)


def test_group_with_equal_rewards_gets_zero_advantage():
    adv = grpo(torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 1.0, 0.0]]))
    assert torch.equal(adv[0], torch.zeros(4))
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv[1], torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.5 / math.sqrt(1 / 3), atol=1e-5)


def test_dr_grpo_only_removes_the_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 6.0]])
    # row 0: mean 1/3; row 1: mean 3
    expected = torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-2.0, -1.0, 3.0]])
    assert torch.allclose(grpo(rewards, scale_by_std=False), expected, atol=1e-6)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_of_one_gets_zero_advantage_without_nan(scale_by_std):
    # torch.std over one element would be nan (and warn); a lone sample carries no relative signal.
    adv = grpo(torch.tensor([[3.0], [-1.0], [0.0]]), scale_by_std=scale_by_std)
    assert adv.shape == (3, 1)
    assert torch.equal(adv, torch.zeros(3, 1))


def test_grpo_is_registered_by_name():
    assert ADVANTAGES.get("grpo") is grpo
    assert "grpo" in ADVANTAGES.names()


@pytest.mark.parametrize(
    "name, token_level, needs_critic",
    [("grpo", False, False), ("rloo", False, False), ("reinforce_pp", True, False), ("gae", True, True)],
)
def test_estimators_declare_their_kind(name, token_level, needs_critic):
    fn = ADVANTAGES.get(name)
    assert (fn.token_level, fn.needs_critic) == (token_level, needs_critic)


def test_every_estimator_carries_both_attributes():
    for name in ADVANTAGES.names():
        fn = ADVANTAGES.get(name)
        assert isinstance(fn.token_level, bool) and isinstance(fn.needs_critic, bool), name


# --- RLOO ----------------------------------------------------------------------------------------------------------


def test_rloo_matches_hand_computed_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 6.0], [1.0, 3.0, 3.0]])
    # each reward minus the mean of the two others:
    # row 0: 1 - (0+0)/2 = 1;     0 - (1+0)/2 = -0.5;  0 - (1+0)/2 = -0.5
    # row 1: 1 - (2+6)/2 = -3;    2 - (1+6)/2 = -1.5;  6 - (1+2)/2 = 4.5
    # row 2: 1 - (3+3)/2 = -2;    3 - (1+3)/2 = 1;     3 - (1+3)/2 = 1
    expected = torch.tensor([[1.0, -0.5, -0.5], [-3.0, -1.5, 4.5], [-2.0, 1.0, 1.0]])
    assert torch.allclose(rloo(rewards), expected, atol=1e-6)


def test_rloo_is_dr_grpo_scaled_by_n_over_n_minus_1():
    rewards = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rloo(rewards), grpo(rewards, scale_by_std=False) * 5 / 4, atol=1e-6)


def test_rloo_equal_group_and_group_of_one_get_zero():
    assert torch.equal(rloo(torch.tensor([[0.5, 0.5, 0.5]])), torch.zeros(1, 3))
    assert torch.equal(rloo(torch.tensor([[3.0], [-1.0]])), torch.zeros(2, 1))  # no other sample: no baseline, no nan
    assert torch.allclose(rloo(torch.tensor([[1.0, 3.0]])), torch.tensor([[-2.0, 2.0]]))  # n = 2: r_i - r_j


# --- token-level ---------------------------------------------------------------------------------------------------

# (B=2, T=5), right-padded prompt then response:
#   row 0: prompt 2 tokens, response 3 (runs to T-1)
#   row 1: prompt 1 token, response 2, padding 2
MASK = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
X = 100.0  # on prompt and padding positions, where nothing may leak from


def test_reinforce_pp_returns_and_whitened_advantages_hand_computed():
    rewards = torch.tensor([[X, X, -0.1, 0.0, 1.0], [X, 0.0, 2.0, X, X]])
    advantages, returns = reinforce_pp(rewards, MASK, None, gamma=0.5)
    # reward-to-go with γ = 0.5, right to left over each row's response tokens:
    #   row 0: G_4 = 1;  G_3 = 0 + 0.5·1 = 0.5;  G_2 = -0.1 + 0.5·0.5 = 0.15
    #   row 1: G_2 = 2;  G_1 = 0 + 0.5·2 = 1
    expected_returns = torch.tensor([[0.0, 0.0, 0.15, 0.5, 1.0], [0.0, 1.0, 2.0, 0.0, 0.0]])
    assert torch.allclose(returns, expected_returns, atol=1e-6)
    # whitening over the 5 response tokens (0.15, 0.5, 1, 1, 2): mean 4.65 / 5 = 0.93
    #   centred (-0.78, -0.43, 0.07, 0.07, 1.07); squares sum 0.6084 + 0.1849 + 0.0049 + 0.0049 + 1.1449 = 1.948
    #   unbiased var 1.948 / 4 = 0.487
    std = math.sqrt(0.487)
    expected = torch.tensor([[0.0, 0.0, -0.78, -0.43, 0.07], [0.0, 0.07, 1.07, 0.0, 0.0]]) / std
    assert torch.allclose(advantages, expected, atol=1e-5)


def test_reinforce_pp_default_gamma_is_the_undiscounted_sum():
    rewards = torch.tensor([[X, X, -0.1, 0.0, 1.0], [X, 0.0, 2.0, X, X]])
    _, returns = reinforce_pp(rewards, MASK, None)
    assert torch.allclose(returns, torch.tensor([[0.0, 0.0, 0.9, 1.0, 1.0], [0.0, 2.0, 2.0, 0.0, 0.0]]))


def test_reinforce_pp_discounts_over_response_tokens_only():
    # a masked position inside the response (e.g. tool output) neither adds nor decays: G_0 = 0.5 · G_2 = 0.5
    _, returns = reinforce_pp(torch.tensor([[0.0, X, 1.0]]), torch.tensor([[1.0, 0.0, 1.0]]), None, gamma=0.5)
    assert torch.allclose(returns, torch.tensor([[0.5, 0.0, 1.0]]))


def test_reinforce_pp_degenerate_batches_only_remove_the_mean():
    # all returns equal (std 0): advantages 0, not 0/0
    adv, _ = reinforce_pp(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]]), None)
    assert torch.equal(adv, torch.zeros(2, 2))
    # one response token in the whole batch: no std to take, the mean removed leaves 0
    adv, returns = reinforce_pp(torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]), None)
    assert torch.equal(adv, torch.zeros(1, 3)) and returns[0, 1].item() == 3.0
    # a row with no response token among others, and a batch with none at all
    rewards = torch.tensor([[0.0, 1.0, 0.0], [X, X, X]])
    adv, returns = reinforce_pp(rewards, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), None)
    assert torch.isfinite(adv).all() and torch.equal(adv[1], torch.zeros(3)) and torch.equal(returns[1], torch.zeros(3))
    adv, returns = reinforce_pp(rewards, torch.zeros(2, 3), None)
    assert torch.equal(adv, torch.zeros(2, 3)) and torch.equal(returns, torch.zeros(2, 3))


# GAE example: γ = 0.9, λ = 0.8 (γλ = 0.72); V before each token, garbage X off the mask.
GAE_REWARDS = torch.tensor([[X, X, 0.0, 0.0, 1.0], [X, -0.1, 0.5, X, X]])
GAE_VALUES = torch.tensor([[X, X, 0.5, 0.6, 0.7], [X, 0.2, 0.4, X, X]])
#   row 0 (response at 2..4, ends at T-1):
#     δ_4 = 1 - 0.7 = 0.3 (no next value)   δ_3 = 0 + 0.9·0.7 - 0.6 = 0.03   δ_2 = 0 + 0.9·0.6 - 0.5 = 0.04
#     A_4 = 0.3   A_3 = 0.03 + 0.72·0.3 = 0.246   A_2 = 0.04 + 0.72·0.246 = 0.21712
#     returns A + V = (0.71712, 0.846, 1.0)
#   row 1 (response at 1..2, then padding):
#     δ_2 = 0.5 - 0.4 = 0.1 (next is padding)   δ_1 = -0.1 + 0.9·0.4 - 0.2 = 0.06
#     A_2 = 0.1   A_1 = 0.06 + 0.72·0.1 = 0.132;   returns (0.332, 0.5)
GAE_ADVANTAGES = torch.tensor([[0.0, 0.0, 0.21712, 0.246, 0.3], [0.0, 0.132, 0.1, 0.0, 0.0]])
GAE_RETURNS = torch.tensor([[0.0, 0.0, 0.71712, 0.846, 1.0], [0.0, 0.332, 0.5, 0.0, 0.0]])


def plain_gae(rewards, values, gamma, lam):
    """One response as plain lists, the textbook loop: no masks, no padding."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_matches_hand_computed_values():
    advantages, returns = gae(GAE_REWARDS, MASK, GAE_VALUES, gamma=0.9, lam=0.8, whiten=False)
    assert torch.allclose(advantages, GAE_ADVANTAGES, atol=1e-6)
    assert torch.allclose(returns, GAE_RETURNS, atol=1e-6)


def test_gae_matches_the_plain_loop_on_each_response():
    advantages, _ = gae(GAE_REWARDS, MASK, GAE_VALUES, gamma=0.9, lam=0.8, whiten=False)
    for row, span in ((0, slice(2, 5)), (1, slice(1, 3))):
        expected = plain_gae(GAE_REWARDS[row, span].tolist(), GAE_VALUES[row, span].tolist(), 0.9, 0.8)
        assert advantages[row, span].tolist() == pytest.approx(expected, abs=1e-6)


def test_gae_whitens_advantages_but_not_returns():
    advantages, returns = gae(GAE_REWARDS, MASK, GAE_VALUES, gamma=0.9, lam=0.8)
    raw = [0.21712, 0.246, 0.3, 0.132, 0.1]
    mean = sum(raw) / 5
    std = math.sqrt(sum((a - mean) ** 2 for a in raw) / 4)
    expected = ((GAE_ADVANTAGES - mean) / std) * MASK
    assert torch.allclose(advantages, expected, atol=1e-5)
    assert torch.allclose(returns, GAE_RETURNS, atol=1e-6)


def test_gae_with_lambda_1_and_zero_values_is_the_reward_to_go():
    rewards = torch.tensor([[X, 0.5, 0.0, 1.0]])
    advantages, returns = gae(rewards, torch.tensor([[0.0, 1.0, 1.0, 1.0]]), torch.zeros(1, 4), lam=1.0, whiten=False)
    assert torch.allclose(advantages, torch.tensor([[0.0, 1.5, 1.0, 1.0]]))  # γ = 1: sums of the rewards to the end
    assert torch.equal(advantages, returns)


def test_gae_row_without_response_tokens_and_missing_critic():
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0], [X, X, X]]), mask, torch.full((2, 3), 0.5))
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[1], torch.zeros(3)) and torch.equal(returns[1], torch.zeros(3))
    with pytest.raises(ValueError, match="gae needs a critic: set algo.critic"):
        gae(torch.zeros(1, 3), mask[:1], None)


def test_signal_share_counts_samples_with_a_nonzero_advantage():
    from rollflow.algos import ADVANTAGES, signal_share

    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    adv = ADVANTAGES.get("grpo")(rewards).flatten()[:, None] * torch.ones(16, 3)  # (B, T)
    mask = torch.ones(16, 3)
    assert signal_share(adv, mask) == 8 / 16  # the two uniform groups carry none
    mask[12:] = 0  # the last group is masked out (e.g. infra errors): not counted either way
    assert signal_share(adv, mask) == 4 / 12
    assert signal_share(adv, torch.zeros(16, 3)) == 0.0
