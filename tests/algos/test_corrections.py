import math

import pytest
import torch

from rollflow.algos import CORRECTIONS, needs_proximal, proximal
from rollflow.algos.corrections import PROXIMALS

# One row of four tokens, the first a prompt token (masked). π_old/μ and π/μ per token are chosen so each weight
# lands on a different side of the caps: ratios 1, 0.5, 1.5, 4 (π_old/μ) and 1, 0.5, 3, 1 (π/μ).
BEHAV = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
OLD = BEHAV + torch.log(torch.tensor([[1.0, 0.5, 1.5, 4.0]]))
CURRENT = BEHAV + torch.log(torch.tensor([[1.0, 0.5, 3.0, 1.0]]))
MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0]])


def weights(name, **params):
    return CORRECTIONS.get(name)(CURRENT, OLD, BEHAV, MASK, **params)


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("none", {}, [1.0, 1.0, 1.0, 1.0]),
        ("tis", {}, [1.0, 0.5, 1.5, 2.0]),  # min(π_old/μ, 2)
        ("tis", {"cap": 3.0}, [1.0, 0.5, 1.5, 3.0]),
        ("decoupled", {}, [1.0, 0.5, 1.5, 4.0]),  # π_old/μ untruncated: 4 ≤ cap 5
        ("decoupled", {"cap": 3.0}, [1.0, 0.5, 1.5, 0.0]),  # 4 > 3: the token is dropped, not shrunk
        ("aipo", {}, [1.0, 0.5, 2.0, 1.0]),  # min(π/μ, ρ = 2): to the current policy, not π_old
        ("aipo", {"rho": 5.0}, [1.0, 0.5, 3.0, 1.0]),
    ],
)
def test_correction_weights_hand_computed(name, params, expected):
    assert torch.allclose(weights(name, **params), torch.tensor([expected]), atol=1e-6)


def test_decoupled_keeps_a_weight_equal_to_the_cap():
    assert weights("decoupled", cap=4.0)[0, 3].item() == pytest.approx(4.0)  # dropped only when above the cap


@pytest.mark.parametrize("name", ["none", "tis", "decoupled", "aipo"])
def test_weights_carry_no_gradient(name):
    current, old = CURRENT.clone().requires_grad_(), OLD.clone().requires_grad_()
    assert not CORRECTIONS.get(name)(current, old, BEHAV, MASK).requires_grad


@pytest.mark.parametrize(
    "name, expected", [("none", "behaviour"), ("tis", "recomputed"), ("decoupled", "recomputed"), ("aipo", "current")]
)
def test_proximal_says_which_pi_old_the_ratio_uses(name, expected):
    assert CORRECTIONS.get(name).proximal == proximal(name) == expected
    assert needs_proximal(name) == (expected == "recomputed")


def test_every_correction_declares_a_known_proximal():
    for name in CORRECTIONS.names():
        assert CORRECTIONS.get(name).proximal in PROXIMALS, name


def test_unknown_correction_name_is_a_key_error():
    with pytest.raises(KeyError, match=r"Did you mean 'aipo'\?"):
        proximal("apo")


def test_decoupled_drops_an_infinite_weight_rather_than_passing_it_on():
    # a behaviour log-prob of -inf (a token μ could not have sampled) gives π_old/μ = inf: dropped, never inf · loss
    behav = torch.tensor([[0.0, -math.inf, 0.0]])
    w = CORRECTIONS.get("decoupled")(torch.zeros(1, 3), torch.zeros(1, 3), behav, torch.ones(1, 3))
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 1.0]]))
