import pytest
import torch

from rollflow.engines.models import (
    BOS,
    EOS,
    PAD,
    TinyModelSpec,
    char_tokenizer,
    load_pretrained,
    save_pretrained,
    tiny_model,
)

ALPHABET = "0123456789+="


def test_char_tokenizer_one_id_per_character():
    tok = char_tokenizer(ALPHABET)
    ids = [tok.encode(c, add_special_tokens=False) for c in ALPHABET]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(ALPHABET)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}.isdisjoint(i[0] for i in ids)
    assert len(tok) == len(ALPHABET) + 3


def test_char_tokenizer_round_trips_and_adds_no_bos():
    tok = char_tokenizer(ALPHABET)
    text = "347+058=504"
    ids = tok.encode(text)
    assert len(ids) == len(text)  # no BOS/EOS added: callers prepend BOS themselves
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_char_tokenizer_ignores_duplicate_and_order_of_alphabet():
    assert char_tokenizer("ba+ab").get_vocab() == char_tokenizer("+ab").get_vocab()


def test_save_and_load_round_trip(tmp_path, tokenizer, make_model):
    model = make_model(seed=3).eval()
    save_pretrained(model, tokenizer, tmp_path)
    loaded, loaded_tok = load_pretrained(tmp_path)

    text = "12+34=64"
    ids = tokenizer.encode(text)
    assert loaded_tok.encode(text) == ids
    # spaces too: loaded as the model type's own tokenizer (Qwen2's byte-level one), they were dropped
    spaced = char_tokenizer("0123456789 +=")
    save_pretrained(model, spaced, tmp_path / "spaced")
    assert load_pretrained(tmp_path / "spaced")[1].encode("1 2 + 3") == spaced.encode("1 2 + 3") != spaced.encode("12+3")
    assert (loaded_tok.pad_token_id, loaded_tok.bos_token_id, loaded_tok.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    x = torch.tensor([[tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        assert torch.equal(model(x, use_cache=False).logits, loaded.eval()(x, use_cache=False).logits)


def test_tiny_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    spec = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    a = tiny_model(spec, tokenizer, seed=5)
    assert torch.equal(torch.rand(1), expected)  # fork_rng: building a model does not move the caller's stream
    b = tiny_model(spec, tokenizer, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = tiny_model(spec, tokenizer, seed=6)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_load_pretrained_without_config_names_model_path(tmp_path):
    expected = r"model\.path='.*' is not a Hugging Face checkpoint directory \(no config\.json\)"
    with pytest.raises(FileNotFoundError, match=expected):
        load_pretrained(tmp_path)
