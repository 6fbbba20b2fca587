"""Batched sampling with a KV cache over any Hugging Face causal LM, whole batches or continuously.

Prompts are left-padded so every row's next token sits in the last column; position ids are computed from the
attention mask, so padded and unpadded prompts see the same positions. The returned log-probs are those of the
temperature-scaled distribution before top-p truncation — the same quantity the trainer recomputes.

``generate`` decodes one batch to completion. ``open_session`` decodes continuously (``api.DecodeSession``): rows
join and leave between forward passes. A joining row is prefilled on its own (with the others joining at that step)
and its keys/values are merged into the running cache: the shorter of the two caches is left-padded along the
sequence axis, its attention mask 0 there, so each row still sees exactly its own tokens at its own positions. A
leaving row is cut out of the batch, and the columns that are padding for every remaining row are cut off the left,
so the cache is as long as the longest row still decoding, never the session's history.
Not covered: paged attention (a merge copies the cache), prefix sharing, speculative decoding (a vLLM engine would
bring those).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from rollflow.api import Generation, SamplingParams
from rollflow.engines.models import VersionedEngine


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability mass reaches ``top_p`` (a float, or one
    value per row, (B, 1); a row at ≥ 1 keeps every token)."""
    if isinstance(top_p, torch.Tensor):
        if bool((top_p >= 1.0).all()):
            return logits
        top_p = top_p.masked_fill(top_p >= 1.0, float("inf"))  # cumsum rounding must not cut such a row's tail
    elif top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # (B, V)
    sorted_logits[mass_before >= top_p] = float("-inf")  # the top token always has mass_before 0: kept
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def left_pad(prompt_ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch: ids, attention mask and position ids, each (B, L)."""
    B, L = len(prompt_ids), max(map(len, prompt_ids))
    ids = torch.full((B, L), pad, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, L - len(p) :] = torch.tensor(p)
        mask[row, L - len(p) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class HFInferenceEngine(VersionedEngine):
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch: int = 512, seed: int = 0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.generator = torch.Generator().manual_seed(seed)
        self._version = 0

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(prompt_ids), self.max_batch):
            out.extend(self._generate_batch(prompt_ids[i : i + self.max_batch], params))
        return out

    def open_session(self) -> HFDecodeSession:
        """A new, empty ``api.DecodeSession`` on these weights (continuous batching: rows join and leave at every step)."""
        return HFDecodeSession(self)

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]:
        B = len(prompt_ids)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids, mask, positions = left_pad(prompt_ids, pad)

        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[:, -1]
        tokens, logprobs = [], []
        done = torch.zeros(B, dtype=torch.bool)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        for _ in range(params.max_new_tokens):
            logp = (logits.float() / max(params.temperature, 1e-6)).log_softmax(-1)  # (B, V)
            if params.greedy:
                tok = logp.argmax(-1)
            else:
                probs = top_p_filter(logp, params.top_p).softmax(-1)
                tok = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            tok = torch.where(done, pad, tok)
            tokens.append(tok)
            logprobs.append(logp.gather(-1, tok[:, None]).squeeze(-1))
            done |= tok == eos
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
            logits = self.model(
                input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True
            ).logits[:, -1]
            next_pos = next_pos + 1
        return [self._generation(toks, lps, self._version)
                for toks, lps in zip(torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist())]

    def _generation(self, toks: list[int], lps: list[float], version: int) -> Generation:
        """One row's sampled ids (cut after the first EOS, which is kept: the policy chose to stop)."""
        eos = self.tokenizer.eos_token_id
        n = toks.index(eos) + 1 if eos in toks else len(toks)
        text = self.tokenizer.decode(toks[: n - 1] if eos in toks else toks[:n], skip_special_tokens=True)
        return Generation(toks[:n], text, lps[:n], [version] * n, "eos" if eos in toks else "length")


@dataclass
class _Row:
    slot: int
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class HFDecodeSession:
    """``api.DecodeSession`` of an ``HFInferenceEngine`` (see the module docstring for the cache merge).

    The running batch: ``rows`` in cache order; ``mask`` (B, S) 1 on each row's tokens (its left padding and the
    padding of merges are 0); ``positions`` (B, 1) the position of each row's next input; ``logits`` (B, V) each row's
    next-token logits, to be sampled at the next step; ``temperature``, ``sampled``, ``top_p`` the rows' sampling
    parameters (``_rows_changed``)."""

    def __init__(self, engine: HFInferenceEngine) -> None:
        self.engine = engine
        self.version = engine.version
        self.joining: list[_Row] = []
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.positions = self.logits = torch.empty(0)
        self._slots = count()
        self._rows_changed()

    def __len__(self) -> int:
        return len(self.joining) + len(self.rows)

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise ValueError("an empty prompt cannot be decoded: give at least one token (e.g. BOS)")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={params.max_new_tokens}: a decode session row needs at least 1")
        row = _Row(next(self._slots), list(prompt_ids), params)
        self.joining.append(row)
        return row.slot

    def drop(self, slot: int) -> None:
        self.joining = [r for r in self.joining if r.slot != slot]
        keep = [i for i, r in enumerate(self.rows) if r.slot != slot]
        if len(keep) < len(self.rows):
            self._keep(keep)

    @torch.no_grad()
    def step(self) -> list[tuple[int, Generation]]:
        if self.rows and self.engine.version != self.version:
            raise RuntimeError(f"weights changed from version {self.version} to {self.engine.version} under a decode "
                               "session with rows in flight; finish (drain) a session before loading weights")
        self.version = self.engine.version
        for i in range(0, len(self.joining), self.engine.max_batch):
            self._join(self.joining[i : i + self.engine.max_batch])
        self.joining = []
        if not self.rows:
            return []

        tok, logp = self._sample()  # (B,), (B,)
        finished, keep = [], []
        eos = self.engine.tokenizer.eos_token_id
        for i, (row, t, lp) in enumerate(zip(self.rows, tok.tolist(), logp.tolist())):
            row.tokens.append(t)
            row.logprobs.append(lp)
            if t == eos or len(row.tokens) >= row.params.max_new_tokens:
                finished.append((row.slot, self.engine._generation(row.tokens, row.logprobs, self.version)))
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            tok = tok[keep]
            self._keep(keep)
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=torch.long)], dim=1)
            self.logits = self.engine.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.positions,
                                            cache=self.cache, use_cache=True).logits[:, -1]
            self.positions = self.positions + 1
        return finished

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A token per row with the row's own sampling parameters, and its log-prob (temperature-scaled, before top-p,
        as ``generate`` records it)."""
        logp = (self.logits.float() / self.temperature).log_softmax(-1)  # (B, V)
        if len(self.sampled) == len(self.rows):  # every row samples (the usual case): no gather and scatter
            probs = (logp if self.top_p is None else top_p_filter(logp, self.top_p)).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=self.engine.generator).squeeze(-1)
        else:
            tok = logp.argmax(-1)
            if len(self.sampled):
                some = logp[self.sampled]
                probs = (some if self.top_p is None else top_p_filter(some, self.top_p)).softmax(-1)
                tok[self.sampled] = torch.multinomial(probs, 1, generator=self.engine.generator).squeeze(-1)
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)

    def _rows_changed(self) -> None:
        """The per-row sampling parameters as tensors, in row order: ``temperature`` (B, 1), ``sampled`` the indices
        of the rows that sample (not greedy), ``top_p`` (n sampled, 1) their nucleus, None when none truncates."""
        params = [r.params for r in self.rows]
        self.temperature = torch.tensor([[max(p.temperature, 1e-6)] for p in params])
        self.sampled = torch.tensor([i for i, p in enumerate(params) if not p.greedy], dtype=torch.long)
        top_p = [params[i].top_p for i in self.sampled.tolist()]
        self.top_p = torch.tensor(top_p)[:, None] if any(p < 1.0 for p in top_p) else None

    def _join(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` and merge them into the running batch (after the rows already there)."""
        ids, mask, positions = left_pad([r.prompt for r in rows], self.engine.tokenizer.pad_token_id)
        cache = DynamicCache()
        logits = self.engine.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   use_cache=True).logits[:, -1]
        if self.cache is None:
            self.cache, self.mask, self.positions, self.logits = cache, mask, positions[:, -1:] + 1, logits
        else:
            S = max(self.mask.shape[1], mask.shape[1])
            self.cache = _cache([(torch.cat([_pad_seq(ka, S), _pad_seq(kn, S)]), torch.cat([_pad_seq(va, S), _pad_seq(vn, S)]))
                                 for (ka, va), (kn, vn) in zip(_layers(self.cache), _layers(cache))])
            self.mask = torch.cat([F.pad(self.mask, (S - self.mask.shape[1], 0)), F.pad(mask, (S - mask.shape[1], 0))])
            self.positions = torch.cat([self.positions, positions[:, -1:] + 1])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows
        self._rows_changed()

    def _keep(self, keep: list[int]) -> None:
        """Only the rows ``keep`` (indices into ``rows``) stay; the padding all of them share is cut off the left."""
        self.rows = [self.rows[i] for i in keep]
        self._rows_changed()
        if not self.rows:
            self.cache, self.mask, self.positions, self.logits = None, torch.empty(0), torch.empty(0), torch.empty(0)
            return
        index = torch.tensor(keep)
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        shared_pad = int(self.mask.argmax(-1).min())  # each row's mask is 0…0 1…1: argmax is its padding length
        self.mask = self.mask[:, shared_pad:]
        self.cache = _cache([(k[index, :, shared_pad:], v[index, :, shared_pad:]) for k, v in _layers(self.cache)])


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (B, heads, S, head_dim). A cache built without a config (as here) has plain
    ``DynamicLayer``s; any other kind (sliding window, linear attention) has no such two tensors to merge."""
    out = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"decode sessions merge plain DynamicCache layers; layer {i} is a "
                                      f"{type(layer).__name__}: use generate() for this model")
        out.append((layer.keys, layer.values))
    return out


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad keys or values (B, heads, S, head_dim) with zeros to ``length`` along the sequence axis."""
    return F.pad(x, (0, 0, length - x.shape[-2], 0))
