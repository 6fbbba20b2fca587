import pytest
import torch

from rollflow.algos import kl_penalty_rewards, overlong_penalty


@pytest.mark.parametrize(
    "max_len, buffer, lengths, expected",
    [
        # max_len 10, buffer 4: free up to 6, then -1/4 per token, -1 from 10 on
        (10, 4, [0, 6, 7, 8, 9, 10, 11, 50], [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]),
        # buffer 0: only the hard -1 above max_len; L = max_len is still fine
        (10, 0, [0, 10, 11], [0.0, 0.0, -1.0]),
        # buffer = max_len: the ramp starts at L = 0
        (10, 10, [0, 5, 10], [0.0, -0.5, -1.0]),
    ],
)
def test_overlong_penalty_edges(max_len, buffer, lengths, expected):
    out = overlong_penalty(torch.tensor(lengths), max_len, buffer)  # integer lengths in, float penalties out
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor(expected))


@pytest.mark.parametrize("buffer", [-1, 11])
def test_overlong_penalty_rejects_a_buffer_outside_0_max_len(buffer):
    with pytest.raises(ValueError, match=rf"buffer must be in \[0, max_len = 10\], got {buffer}"):
        overlong_penalty(torch.tensor([5]), 10, buffer)


def test_kl_penalty_rewards_hand_computed_and_detached():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    # k1 = log π − ref = (0.5, -1) → -0.1·k1 = (-0.05, 0.1)
    out = kl_penalty_rewards(logprobs, ref, coef=0.1)
    assert torch.allclose(out, torch.tensor([[-0.05, 0.1]]))
    assert not out.requires_grad
    # k3 with x = ref − log π = (-0.5, 1): e^-0.5 + 0.5 − 1 = 0.106531, e − 2 = 0.718282
    expected = torch.tensor([[-0.0106531, -0.0718282]])
    assert torch.allclose(kl_penalty_rewards(logprobs, ref, 0.1, "k3"), expected, atol=1e-6)
