"""A task read from the user's own JSONL / JSON / Parquet file, one problem per row.

Rows are loaded with Hugging Face ``datasets`` (so they pass through its on-disk cache) and checked once, at
construction: every error names the file and, for a bad row, its 1-based row number (for a JSON syntax error, the
line of the file). Columns other than the prompt and answer ride along in ``Problem.meta`` for the reward function. A numeric answer is turned into text with
``str()``; Arrow reads a column mixing ints and floats as floats (``2`` → ``"2.0"``), so store answers as strings
where their exact text matters.

The held-out set comes from ``eval_path``, or else is a seeded ``eval_fraction`` of the rows. Either way it is
disjoint from training *by row*, not by content: a prompt repeated in the data can land on both sides, and nothing
compares the contents of ``path`` and ``eval_path``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from rollflow.api import Problem, RewardFn, RewardResult
from rollflow.tasks.reward_fn import RewardSpec, call_reward_fn, exact_match

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class TaskDataError(ValueError):
    """The task's data file is missing, unreadable, or holds a row that cannot become a ``Problem``."""


def _is_empty(path: Path, loader: str) -> bool:
    # `datasets` fails on a file without rows with a bare StopIteration or an Arrow batch-size error; say "empty".
    if loader == "parquet":
        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not a Parquet file at all: let `datasets` report it
            return False
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _root_cause(e: BaseException) -> BaseException:
    # `datasets` wraps parse errors in "An error occurred while generating the dataset"; the cause says where.
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _json_problem(file: Path) -> str | None:
    """Where a JSON / JSON-lines file breaks, by line, and what to do; None if it parses (the problem is elsewhere).

    Read only after ``datasets`` has failed: Arrow's own message counts rows within a block, not lines of the file."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text (byte {e.start}); save it as UTF-8"
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole:
        first_error = whole
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
        one_per_line = True
    except json.JSONDecodeError:
        one_per_line = file.suffix.lower() == ".jsonl"
    if not one_per_line:  # one JSON document (an array of rows, perhaps spread over many lines)
        return f"line {first_error.lineno}, column {first_error.colno} is not valid JSON ({first_error.msg}); fix it there"
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n}, column {e.colno} is not valid JSON ({e.msg}); fix that line"
        if not isinstance(row, dict):
            return (f"line {n} holds a JSON {type(row).__name__}, not an object; each line must be one row, "
                    '{"prompt": ..., "answer": ...}')
    return None


def _answer(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):  # JSON numbers; bool is an int
        return str(value)
    return None


def _absent(row: dict[str, Any], column: str, column_key: str) -> str:
    """For a row whose ``column`` is null (JSON lines: the key is missing or null): the fields it does have."""
    if row[column] is not None:
        return ""
    present = [k for k, v in row.items() if v is not None]
    return (f" (this row has no {column!r}; its fields: {present}); add it to the row, "
            f"or set {column_key} if the column has another name")


def read_problems(path: str, key: str, prompt_column: str, answer_column: str) -> list[Problem]:
    """Load and check every row of ``path``; ``key`` is the config key that named the file, for messages."""
    file = Path(path)
    if file.is_dir():
        raise TaskDataError(f"{key}: {path!r} is a directory; give the data file inside it")
    if not file.is_file():
        where = "" if file.is_absolute() else f" (a relative path is read from the working directory {os.getcwd()!r})"
        raise TaskDataError(f"{key}: file {path!r} does not exist{where}; fix {key}")
    loader = LOADERS.get(file.suffix.lower())
    if loader is None:
        raise TaskDataError(f"{key}: file {path!r} has an unsupported extension; use one of {', '.join(LOADERS)}")
    if _is_empty(file, loader):
        raise TaskDataError(f"{key}: file {path!r} is empty; it needs one problem per row")
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()  # a split of a local file takes no time: its bar would only clutter the run's output
    # Its "Failed to load JSON ... in row 1" error log would repeat our error, less exactly (Arrow counts rows per block).
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(loader, data_files=str(file), split="train")
    except Exception as e:
        cause = _root_cause(e)
        if "corresponds to no data" in str(cause):  # `datasets`' words for a JSON file holding `[]` or `{}`
            raise TaskDataError(f"{key}: file {path!r} has no rows") from e
        where = _json_problem(file) if loader == "json" else None
        if where is not None:
            raise TaskDataError(f"{key}: cannot read {path!r} as {file.suffix.lower()[1:]}: {where}") from e
        raise TaskDataError(
            f"{key}: cannot read {path!r} as {file.suffix.lower()[1:]} ({type(cause).__name__}: {cause}); "
            f"check that it is a valid {file.suffix.lower()[1:]} file"
        ) from e
    finally:
        if bars:
            datasets.enable_progress_bars()
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise TaskDataError(f"{key}: file {path!r} has no rows")
    for column, column_key, role in (
        (prompt_column, "task.prompt_column", "prompts"),
        (answer_column, "task.answer_column", "answers"),
    ):
        if column not in ds.column_names:
            raise TaskDataError(
                f"{key}: file {path!r} has no column {column!r} (its columns: {ds.column_names}); "
                f"set {column_key} to the column that holds the {role}"
            )
    problems = []
    for i, row in enumerate(ds, start=1):
        prompt, answer = row[prompt_column], _answer(row[answer_column])
        if not isinstance(prompt, str) or not prompt.strip():
            raise TaskDataError(f"{key}: file {path!r}, row {i}: prompt must be a non-empty string, got {prompt!r}"
                                f"{_absent(row, prompt_column, 'task.prompt_column')}")
        if answer is None or not answer.strip():
            raise TaskDataError(
                f"{key}: file {path!r}, row {i}: answer must be a non-empty string or a number, "
                f"got {row[answer_column]!r}{_absent(row, answer_column, 'task.answer_column')}"
            )
        meta = {k: v for k, v in row.items() if k not in (prompt_column, answer_column)}
        problems.append(Problem(prompt=prompt, answer=answer, meta=meta))
    return problems


class FileTask:
    """Problems from a file; scored by ``reward_fn`` (a spec for ``load_reward_fn``) or by ``exact_match``.

    The function is loaded here, so that a bad spec fails at construction, and travels as its spec (``RewardSpec``)
    when the task is pickled to a worker. The sample index in a reward function's error message counts ``verify``
    calls on this object.
    """

    name = "file"

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        eval_path: str | None = None,
        eval_fraction: float = 0.1,
        reward_fn: str | None = None,
        seed: int = 0,
    ) -> None:
        rows = read_problems(path, "task.path", prompt_column, answer_column)
        if eval_path is not None:
            self._train = rows
            self._eval = read_problems(eval_path, "task.eval_path", prompt_column, answer_column)
        else:
            if not 0.0 < eval_fraction < 1.0:
                raise ValueError(f"task.eval_fraction={eval_fraction} must be strictly between 0 and 1")
            if len(rows) < 2:
                raise TaskDataError(
                    f"task.path: file {path!r} has only 1 row; a train/eval split needs at least 2 "
                    "(add rows or set task.eval_path)"
                )
            n_eval = min(max(1, round(eval_fraction * len(rows))), len(rows) - 1)
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            held_out = set(order[:n_eval])
            # Both sides keep file order, so the split depends on `seed` alone.
            self._eval = [p for i, p in enumerate(rows) if i in held_out]
            self._train = [p for i, p in enumerate(rows) if i not in held_out]
        self._reward_name = reward_fn or "rollflow.tasks.reward_fn:exact_match"
        self._reward_fn: RewardFn = exact_match
        if reward_fn:
            spec = RewardSpec(reward_fn)
            spec.load()
            self._reward_fn = spec
        self._calls = itertools.count()

    def alphabet(self) -> str:
        return "".join(sorted({c for p in self._train + self._eval for c in p.prompt + p.answer}))

    def train_problems(self, seed: int) -> Iterator[Problem]:
        """Every training row once per epoch, in a fresh seeded order each epoch, forever."""
        rng = random.Random(seed)
        while True:
            yield from rng.sample(self._train, len(self._train))

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def reference(self, problem: Problem) -> str:
        return problem.answer

    def verify(self, problem: Problem, response: str) -> RewardResult:
        return call_reward_fn(self._reward_fn, self._reward_name, problem, response, next(self._calls))
