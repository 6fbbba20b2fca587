"""Suite-wide fixtures: one torch thread (the machine is shared), and the tiny model every engine test uses."""

import pytest
import torch

from rollflow.engines.models import TinyModelSpec, char_tokenizer, tiny_model

ALPHABET = "0123456789+="
# The smallest Qwen2 that still exercises every code path: one layer, two heads.
TINY = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=64)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # Tests run beside a training job on 2 cores; more threads would only make both slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(ALPHABET)


@pytest.fixture
def make_model(tokenizer):
    """``make_model(seed)`` → a fresh tiny model; call it twice with one seed for two identical models."""
    return lambda seed=0: tiny_model(TINY, tokenizer, seed)
