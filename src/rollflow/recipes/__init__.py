"""Recipes: the wiring of a whole run, one readable function each."""

from rollflow.recipes.grpo import RunResult, train

__all__ = ["RunResult", "train"]
