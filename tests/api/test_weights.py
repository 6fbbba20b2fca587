import pytest
import torch

from rollflow.api import VersionedWeights, WeightChecksumError, checksum
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, tiny_model
from rollflow.runtime.weights import InlineWeightTransport


def tensors():
    return {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([0.5, -1.0])}


def test_pack_then_verify_passes_and_pack_copies():
    source = tensors()
    weights = VersionedWeights.pack(3, source)
    weights.verify()
    assert weights.version == 3 and weights.checksum == checksum(source)
    source["w"][0, 0] = 42.0  # the trainer keeps training after publishing
    weights.verify()
    assert weights.tensors["w"][0, 0] == 0.0


def test_tampered_tensor_fails_verify():
    weights = VersionedWeights.pack(3, tensors())
    weights.tensors["w"][1, 2] += 1e-3
    with pytest.raises(WeightChecksumError, match=r"weights of version 3 arrived corrupted: checksum .* != published"):
        weights.verify()


def test_checksum_covers_names_dtypes_and_shapes():
    base = checksum({"w": torch.zeros(4)})
    assert checksum({"w": torch.zeros(4)}) == base
    assert checksum({"v": torch.zeros(4)}) != base
    assert checksum({"w": torch.zeros(4, dtype=torch.int32)}) != base  # same bytes, other dtype
    assert checksum({"w": torch.zeros(2, 2)}) != base  # same bytes, other shape
    assert checksum({"a": torch.ones(1), "b": torch.zeros(1)}) == checksum({"b": torch.zeros(1), "a": torch.ones(1)})


def test_engine_rejects_tampered_weights_and_keeps_its_own(tokenizer, make_model):
    engine = HFInferenceEngine(make_model(seed=0), tokenizer)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    weights = VersionedWeights.pack(1, make_model(seed=1).state_dict())
    name = "model.layers.0.mlp.up_proj.weight"
    weights.tensors[name][0, 0] += 1.0

    with pytest.raises(WeightChecksumError, match="weights of version 1 arrived corrupted"):
        engine.load_weights(weights)
    assert engine.version == 0
    after = engine.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_engine_loads_verified_weights(tokenizer, make_model):
    engine = HFInferenceEngine(make_model(seed=0), tokenizer)
    new = make_model(seed=1).state_dict()
    engine.load_weights(VersionedWeights.pack(2, new))
    assert engine.version == 2
    assert all(torch.equal(v, new[k]) for k, v in engine.model.state_dict().items())


def test_engine_rejects_incompatible_weights_and_keeps_its_own(tokenizer, make_model):
    engine = HFInferenceEngine(make_model(seed=0), tokenizer)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    # a checkpoint of another model: same names, a wider MLP
    wider = tiny_model(TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=64), tokenizer, seed=1)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        engine.load_weights(VersionedWeights.pack(1, wider.state_dict()))
    assert engine.version == 0
    after = engine.model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_inline_transport_requires_increasing_versions():
    transport = InlineWeightTransport()
    assert transport.latest(newer_than=-1) is None
    first = VersionedWeights.pack(1, tensors())
    transport.publish(first)
    for version in (1, 0):
        with pytest.raises(ValueError, match=rf"version {version} published after version 1; versions must increase"):
            transport.publish(VersionedWeights.pack(version, tensors()))
    assert transport.latest(newer_than=0) is first
    assert transport.latest(newer_than=1) is None  # nothing newer: nothing is handed over
    transport.publish(second := VersionedWeights.pack(2, tensors()))
    assert transport.latest(newer_than=1) is second
