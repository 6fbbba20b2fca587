"""Models and tokenizers: the built-in tiny causal LM, and loading any local Hugging Face checkpoint.

The built-in model is a real Hugging Face architecture (Qwen2) with a small config; its tokenizer is a
character-level ``tokenizers`` model made offline from the task's alphabet, so nothing is downloaded and both
round-trip through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rollflow.api import VersionedWeights

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet`` plus pad/bos/eos. The tokenizer does not add BOS itself;
    callers prepend it so prompts and training sequences start the same way."""
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a word
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 64


def tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


# what else a user can write in the field a checkpoint path came from
HINTS = {"model.path": ", or leave model.path unset for the built-in tiny model",
         "task.instrumenter": ", or task.instrumenter=rules for the rule-based instrumenter"}


def load_pretrained(path: str | Path, field: str = "model.path") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local Hugging Face directory (never from a hub); errors name the
    config ``field`` the path came from."""
    tokenizer = load_tokenizer(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:  # no weights file, a config transformers cannot read, a truncated file
        raise FileNotFoundError(f"{field}={str(path)!r} holds no loadable model ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); give a folder written by save_pretrained") from e
    return model, tokenizer


def load_tokenizer(path: str | Path, field: str = "model.path") -> PreTrainedTokenizerFast:
    """The tokenizer of a local Hugging Face checkpoint directory (its pad token set to EOS if it has none)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{field}={str(path)!r} is not a Hugging Face checkpoint directory (no config.json); "
            f"give a folder written by save_pretrained{HINTS.get(field, '')}"
        )
    try:
        if _saved_class(path) in PLAIN_TOKENIZERS:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # a broken config.json, no tokenizer files
        raise FileNotFoundError(f"{field}={str(path)!r} holds no loadable tokenizer ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); give a folder written by save_pretrained") from e
    if tokenizer.pad_token is None:  # many LM tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Tokenizers saved as a plain tokenizers pipeline (the built-in character tokenizer among them). AutoTokenizer would
# load them as the model type's own class (Qwen2Tokenizer for the built-in model), which rebuilds a byte-level
# pipeline around the saved vocabulary: every space would be dropped.
PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # no such file, or not a JSON object: AutoTokenizer says what is wrong
        return None


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_versioned(model: torch.nn.Module, weights: VersionedWeights, current_version: int) -> None:
    """Verify ``weights``' checksum and load them into ``model``; on any mismatch the model keeps its weights."""
    weights.verify()
    own = model.state_dict()
    misfit = sorted(k for k in own.keys() | weights.tensors.keys()
                    if k not in own or k not in weights.tensors or own[k].shape != weights.tensors[k].shape)
    if misfit:
        raise RuntimeError(f"weights of version {weights.version} do not fit this model (missing, extra or reshaped: "
                           f"{', '.join(misfit[:5])}{' …' if len(misfit) > 5 else ''}); keeping version {current_version}")
    model.load_state_dict(weights.tensors)


class VersionedEngine:
    """The weight-version half of every engine that only receives weights (rollout, reference, simulator policy):
    it holds one version of ``self.model`` at a time and changes it only through verified ``VersionedWeights``."""

    model: torch.nn.Module
    _version: int

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, weights: VersionedWeights) -> None:
        load_versioned(self.model, weights, self._version)
        self._version = weights.version
