import math

import pytest
import torch

from rollflow.algos import KL_ESTIMATORS
from rollflow.algos.kl import k1, k2, k3

# log π − log π_ref per token: 0, -1, +1
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.0, -1.0, -1.5]])
E = math.e


@pytest.mark.parametrize(
    "estimator, expected, expected_grad",
    [
        (k1, [0.0, -1.0, 1.0], [1.0, 1.0, 1.0]),  # d = log π − ref;  d k1/d log π = 1
        (k2, [0.0, 0.5, 0.5], [0.0, -1.0, 1.0]),  # ½d²;  d k2/d log π = d
        # x = ref − log π = (0, 1, -1): e^x − x − 1 = (0, e − 2, 1/e);  d k3/d log π = 1 − e^x
        (k3, [0.0, E - 2, 1 / E], [0.0, 1 - E, 1 - 1 / E]),
    ],
)
def test_kl_estimators_hand_computed(estimator, expected, expected_grad):
    logprobs = LOGPROBS.clone().requires_grad_()
    out = estimator(logprobs, REF)
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)
    out.sum().backward()
    assert torch.allclose(logprobs.grad, torch.tensor([expected_grad]), atol=1e-6)


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # exact expectation over a 3-token vocabulary: E_{x~p}[k(x)] against KL(p || q) = Σ p log p/q
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.2, 0.3, 0.5])
    kl = (p * (p / q).log()).sum()
    expectation = {name: (p * KL_ESTIMATORS.get(name)(p.log(), q.log())).sum() for name in ("k1", "k2", "k3")}
    assert expectation["k1"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert expectation["k3"].item() == pytest.approx(kl.item(), abs=1e-6)
    assert abs(expectation["k2"].item() - kl.item()) > 0.01


def test_k2_and_k3_are_never_negative():
    gen = torch.Generator().manual_seed(0)
    logprobs, ref = -5 * torch.rand(4, 50, generator=gen), -5 * torch.rand(4, 50, generator=gen)
    assert (k2(logprobs, ref) >= 0).all() and (k3(logprobs, ref) >= 0).all()
    assert (k1(logprobs, ref) < 0).any()


def test_kl_estimators_are_registered():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert KL_ESTIMATORS.get("k3") is k3
