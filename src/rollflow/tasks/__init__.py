"""Built-in verifiable tasks and the user's own (a data file plus an optional reward function)."""

from __future__ import annotations

from typing import Any

from rollflow.api import Task
from rollflow.tasks.addition import AdditionTask
from rollflow.tasks.file_task import FileTask, TaskDataError
from rollflow.tasks.guess import GuessTask
from rollflow.tasks.program import ProgramTask
from rollflow.tasks.reward_fn import RewardFnError, RewardSpec, check_reward, load_reward_fn
from rollflow.tasks.sorting import SortingTask

BUILTIN: dict[str, type] = {"addition": AdditionTask, "sorting": SortingTask, "file": FileTask, "guess": GuessTask,
                           "program": ProgramTask}


def build_task(config: Any, seed: int = 0) -> Task:
    """Instantiate the task a ``config.task`` section names; its other fields are the constructor's arguments."""
    fields = config.model_dump()
    cls = BUILTIN[fields.pop("name")]
    if cls is FileTask:
        fields["seed"] = seed
    return cls(**fields)


__all__ = [
    "AdditionTask", "BUILTIN", "FileTask", "GuessTask", "ProgramTask", "RewardFnError", "RewardSpec", "SortingTask", "TaskDataError", "build_task",
    "check_reward", "load_reward_fn",
]
