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


@pytest.fixture
def model(make_model):
    """A tiny model whose every next token depends on the whole prefix. Freshly initialised (std 0.02, tied
    embeddings) it only echoes its last token, which would let a position, padding or cache-merge bug pass unnoticed;
    large random weights (norms left alone) make such a bug change the tokens."""
    model = make_model(seed=1).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model
