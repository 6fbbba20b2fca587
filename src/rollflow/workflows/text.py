"""The single-turn text workflow (``SingleTurn``: a prompt, one response, what GRPO on a verifiable task runs) and
``Tokens``, the text ↔ ids conversion every text workflow shares. Multi-turn agents are ``workflows.agent``."""

from __future__ import annotations

import time
from typing import Any

from rollflow.api import EpisodeContext, Generation, Problem, Trajectory, TrajectoryBuilder
from rollflow.api.trajectory import ENV, MODEL, PROMPT


class Tokens:
    """Text ↔ token ids the way every text stage needs them: prompts start with BOS, targets end with EOS,
    environment observations are plain ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        except Exception as e:  # a vocabulary without an unknown token (the built-in character tokenizer) refuses
            vocab = self.tokenizer.get_vocab()
            missing = "".join(sorted({c for c in text if c not in vocab}))
            raise ValueError(f"cannot tokenise {text[:80]!r}: characters {missing!r} are not in the tokenizer's "
                             f"vocabulary (the built-in model's tokenizer is made from the task's alphabet(): "
                             f"add them there, or keep the environment's text to it)") from e

    def prompt(self, text: str) -> list[int]:
        return self.bos + self.encode(text)

    def target(self, text: str) -> list[int]:
        return self.encode(text) + [self.tokenizer.eos_token_id]

    def episode(self, turns: list[tuple[str, str]]) -> Trajectory:
        """A demonstrated episode, (source, text) turns, tokenised the way ``AgentLoop`` produces one: the prompt with
        BOS, each model turn ending with EOS (in the loss), each observation plain (context only)."""
        builder = TrajectoryBuilder()
        for source, text in turns:
            if source == PROMPT:
                builder.prompt(self.prompt(text))
            elif source == ENV:
                builder.env(self.encode(text))
            elif source == MODEL:
                ids = self.target(text)
                builder.model(Generation(ids, text, [0.0] * len(ids), [-1] * len(ids), "eos"))
            else:
                raise ValueError(f"a demonstration turn's source must be {PROMPT!r}, {MODEL!r} or {ENV!r}, got {source!r}")
        return builder.build()


class SingleTurn:
    """The prompt, one sampled response; a reward stage scores its text. A group's episodes share their prompt, so
    its ids are computed once (the last ``cache`` prompts are kept)."""

    def __init__(self, tokens: Tokens, cache: int = 4096) -> None:
        self.tokens, self.cache = tokens, cache
        self._ids: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self._ids:
            if len(self._ids) >= self.cache:
                self._ids.pop(next(iter(self._ids)))  # the oldest prompt
            self._ids[text] = self.tokens.prompt(text)
        return list(self._ids[text])

    async def run(self, task: Problem, ctx: EpisodeContext) -> Trajectory:
        ctx.trajectory.prompt(self.prompt_ids(task.prompt))
        started = time.time()
        generation = await ctx.engine.generate(ctx.trajectory.tokens)
        ctx.trajectory.model(generation, started)
        return ctx.trajectory.build()
