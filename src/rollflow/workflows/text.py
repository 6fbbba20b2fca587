"""Text workflows: one model turn per problem (``SingleTurn``, what GRPO on a verifiable task runs), or turns
alternating with a text environment (``MultiTurn``: tools, code runners, games)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rollflow.api import EnvStep, EpisodeContext, Problem, RewardResult, SamplingParams, TextEnv, Trajectory


class Tokens:
    """Text ↔ token ids the way every text stage needs them: prompts start with BOS, targets end with EOS,
    environment observations are plain ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, text: str) -> list[int]:
        return self.bos + self.encode(text)

    def target(self, text: str) -> list[int]:
        return self.encode(text) + [self.tokenizer.eos_token_id]


class SingleTurn:
    """The prompt, one sampled response; a reward stage scores its text. A group's episodes share their prompt, so
    its ids are computed once (the last ``cache`` prompts are kept)."""

    def __init__(self, tokens: Tokens, params: SamplingParams, cache: int = 4096) -> None:
        self.tokens, self.params, self.cache = tokens, params, cache
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
        generation = await ctx.engine.generate(ctx.trajectory.tokens, self.params)
        ctx.trajectory.model(generation, started)
        return ctx.trajectory.build()


class MultiTurn:
    """Model turns alternating with a ``TextEnv``'s observations, until the environment says done or ``max_turns``.

    The environment's first observation is the prompt. Each model turn is sampled on every token so far, exactly as
    produced (nothing is re-tokenised); each observation is tokenised once and appended, outside the loss mask. The
    episode's reward is the sum of the environment's step rewards, unless ``score_text`` is set, in which case a
    reward stage scores the last model turn's text (the environment then only shapes the conversation)."""

    def __init__(self, make_env: Callable[[], TextEnv], tokens: Tokens, params: SamplingParams, max_turns: int = 4,
                 score_text: bool = False) -> None:
        self.make_env, self.tokens, self.params = make_env, tokens, params
        self.max_turns, self.score_text = max_turns, score_text

    async def run(self, task: Any, ctx: EpisodeContext) -> Trajectory:
        env = self.make_env()
        started = time.time()
        ctx.trajectory.prompt(self.tokens.prompt(await ctx.env(env.reset, task)), started)
        total, turns = 0.0, 0
        step = EnvStep("", done=False)
        while turns < self.max_turns and not step.done:
            started = time.time()
            generation = await ctx.engine.generate(ctx.trajectory.tokens, self.params)
            ctx.trajectory.model(generation, started)
            turns += 1
            started = time.time()
            step = await ctx.env(env.step, generation.response_text)
            total += step.reward
            if not step.done and turns < self.max_turns:
                ctx.trajectory.env(self.tokens.encode(step.observation), started)
        reward = None if self.score_text else RewardResult(total)
        return ctx.trajectory.build(reward=reward, turns=turns, done=step.done)
