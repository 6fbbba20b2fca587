"""The agent loop: model turns alternating with an environment's observations, token in, token out.

Each model turn is sampled on every token of the episode so far, exactly as produced: the prompt's ids, each model
turn's ids as the engine sampled them (its EOS included), each observation's ids appended once. Nothing is decoded
and encoded again, so the ids the trainer trains on are the ids the policy sampled, and the log-probs recorded with
them stay valid. Model tokens enter the loss; prompt and observation tokens are context only (loss mask 0).

The episode ends when the environment says ``done``, after ``max_turns`` model turns, or when the context reaches
``max_context`` tokens. Its return is the sum of the turns' rewards discounted by ``discount`` per turn
(``Σ_k γ^k r_k``; γ = 1 by default); its status is its last step's (``info["status"]``: ``ok``, ``agent_error``,
``timeout``). Each step's span is a turn of the trajectory (an observation that is not shown, the last one, is an
empty turn that keeps its span), so the time the agent's actions took is read from ``Trajectory.turns``. Timeouts
and environment faults are applied by the rollout worker (``ctx.env``): a step past ``rollout.env_timeout`` ends the
episode as ``timeout`` with what it produced, an environment that raises ends it as ``infra_error`` (retried, never
rewarded), and neither touches the other episodes of the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rollflow.api import Env, EpisodeContext, RewardResult, Status, SyncEnv, Trajectory
from rollflow.api.trajectory import ENV, MODEL
from rollflow.envs.wrap import as_async
from rollflow.workflows.text import Tokens


class AgentLoop:
    """``api.RolloutWorkflow`` for multi-turn text agents; ``make_env()`` builds one environment per episode.

    With ``score_text`` the environment only shapes the conversation and a reward stage scores the last model turn's
    text; otherwise the environment's discounted return is the episode's reward."""

    def __init__(self, make_env: Callable[[], Env | SyncEnv], tokens: Tokens, max_turns: int = 4,
                 discount: float = 1.0, score_text: bool = False, max_context: int | None = None) -> None:
        if max_turns < 1 or not 0.0 <= discount <= 1.0:
            raise ValueError(f"AgentLoop needs max_turns >= 1 and 0 <= discount <= 1, got {max_turns}, {discount}")
        self.make_env, self.tokens, self.max_turns, self.discount = make_env, tokens, max_turns, discount
        self.score_text, self.max_context = score_text, max_context

    async def run(self, task: Any, ctx: EpisodeContext) -> Trajectory:
        env = as_async(self.make_env())
        started = time.time()
        ctx.trajectory.prompt(self.tokens.prompt(await ctx.env(env.reset, task)), started)
        rewards: list[float] = []
        transcript: list[list[str]] = []  # [source, text] per turn after the prompt, for the run's logs
        status, done, finish = Status.OK, False, None
        while len(rewards) < self.max_turns and not done:
            if self.max_context is not None and len(ctx.trajectory.tokens) >= self.max_context:
                finish = "length"  # no room left for another turn
                break
            started = time.time()
            generation = await ctx.engine.generate(ctx.trajectory.tokens)
            ctx.trajectory.model(generation, started)
            transcript.append([MODEL, generation.response_text])
            started = time.time()
            step = await ctx.env(env.step, generation.response_text)
            rewards.append(step.reward)
            status, done = Status(step.info.get("status", Status.OK.value)), step.done
            shown = not done and len(rewards) < self.max_turns
            ctx.trajectory.env(self.tokens.encode(step.observation) if shown else [], started)
            if shown:
                transcript.append([ENV, step.observation])
        ret = sum(r * self.discount**k for k, r in enumerate(rewards))
        reward = None if self.score_text else RewardResult(ret, {"return": ret, "turns": float(len(rewards))}, status)
        return ctx.trajectory.build(status=status, reward=reward, finish_reason=finish, turns=len(rewards), done=done,
                                    turn_rewards=rewards, transcript=transcript)
