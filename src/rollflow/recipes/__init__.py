"""Recipes: the wiring of a whole run, one readable function each: ``grpo`` for language models, ``sim`` for
simulator agents. ``train`` runs the one the config describes (``sim`` set: the simulator recipe)."""

from __future__ import annotations

from rollflow.api import RewardFn, Task
from rollflow.config import Config
from rollflow.recipes import grpo, sim
from rollflow.recipes.grpo import RunResult


def train(config: Config, task: Task | None = None, reward_fn: RewardFn | None = None, *, resume: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run ``config``'s recipe (see ``grpo.train`` and ``sim.train``); ``task`` and ``reward_fn`` are the language-model
    recipe's."""
    if config.sim is not None:
        if task is not None or reward_fn is not None:
            raise ValueError("a task or reward function was given for a simulator run (config.sim is set); the "
                             "simulator recipe's rewards are the environment's")
        return sim.train(config, resume=resume, overwrite=overwrite)
    return grpo.train(config, task, reward_fn, resume=resume, overwrite=overwrite)


__all__ = ["RunResult", "train"]
