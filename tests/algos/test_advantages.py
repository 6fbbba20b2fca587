import math

import pytest
import torch

from rollflow.algos import ADVANTAGES
from rollflow.algos.advantages import grpo


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
