"""Batched sampling with a KV cache over any Hugging Face causal LM.

Prompts are left-padded so every row's next token sits in the last column; position ids are computed from the
attention mask, so padded and unpadded prompts see the same positions. The returned log-probs are those of the
temperature-scaled distribution before top-p truncation — the same quantity the trainer recomputes.
Not covered: paged attention, continuous batching, speculative decoding (a vLLM engine would bring those).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rollflow.api import Generation, SamplingParams
from rollflow.engines.models import VersionedEngine


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability mass reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # (B, V)
    sorted_logits[mass_before >= top_p] = float("-inf")  # the top token always has mass_before 0: kept
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


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

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]:
        B, L = len(prompt_ids), max(map(len, prompt_ids))
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for row, p in enumerate(prompt_ids):
            ids[row, L - len(p) :] = torch.tensor(p)
            mask[row, L - len(p) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)

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
        return self._unpack(torch.stack(tokens, 1), torch.stack(logprobs, 1), eos)

    def _unpack(self, tokens: torch.Tensor, logprobs: torch.Tensor, eos: int) -> list[Generation]:
        gens = []
        for toks, lps in zip(tokens.tolist(), logprobs.tolist()):
            n = toks.index(eos) + 1 if eos in toks else len(toks)  # keep EOS: the policy chose to stop
            text = self.tokenizer.decode(toks[: n - 1] if eos in toks else toks[:n], skip_special_tokens=True)
            gens.append(Generation(toks[:n], text, lps[:n], [self._version] * n, "eos" if eos in toks else "length"))
        return gens
