"""User reward functions: load one from a spec string, call it, and turn every misbehaviour into an error.

A spec is ``"package.module:function"`` (imported with the working directory first on ``sys.path``, as
``python -m`` and pytest do, so ``my_reward:score`` finds ``./my_reward.py``) or ``"path/to/file.py:function"``
(relative to the working directory; executed as a fresh module each time it is loaded; its directory is *not* added
to ``sys.path``, so it cannot import its neighbours unless they are importable anyway).

``RewardSpec`` is the function as its spec: pickled, it carries the spec and the working directory it was made in,
and each process that calls it loads the function there. A function from a file lives in a private module that
exists only where the file was executed, so it cannot be pickled by reference; a spec can.

Nothing here turns an exception into a reward of 0.0: a reward function that raises or returns something that is
not a finite number or a ``RewardResult`` stops the run with an error naming the function and the sample.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
import threading
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from rollflow.api import Problem, RewardFn, RewardResult, Task

SPEC_FORMS = "'package.module:function' or 'path/to/file.py:function'"


class RewardFnError(ValueError):
    """A reward function could not be loaded, or raised or returned something unusable when called.

    The message says what went wrong, then (``detail``) where it was raised and on which sample."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(f"{message}; {detail}" if detail else message)
        self.message, self.detail = message, detail


def exact_match(problem: Problem, response: str) -> RewardResult:
    """1 if the response equals the answer after stripping surrounding whitespace from both, else 0."""
    exact = float(response.strip() == problem.answer.strip())
    return RewardResult(exact, {"exact": exact})


def _module_from_file(spec: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise RewardFnError(f"reward fn {spec!r}: file {str(path)!r} does not exist; fix the path in the spec")
    # A private, path-derived name: the file's bare stem could shadow a real module such as `reward` or `math`.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    name = f"_rollflow_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardFnError(f"reward fn {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before executing so that dataclasses and pickling inside the file can find their module.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise RewardFnError(
            f"reward fn {spec!r}: executing {str(path)!r} raised {type(e).__name__}: {e}; fix the file"
        ) from e
    return module


def _import(spec: str, target: str, cwd: str) -> ModuleType:
    if target.endswith(".py"):
        return _module_from_file(spec, Path(cwd, target))  # an absolute target stays as it is
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.insert(0, cwd)  # kept: the module may import its neighbours later, from inside the function
    try:
        return importlib.import_module(target)
    except Exception as e:  # a module can raise anything at import time, not only ImportError
        raise RewardFnError(
            f"reward fn {spec!r}: cannot import module {target!r} ({type(e).__name__}: {e}); make it importable "
            f"(put it in the working directory {cwd!r}, install it or add its directory to PYTHONPATH) "
            f"or give a file path, {SPEC_FORMS}"
        ) from e


def load_reward_fn(spec: str, cwd: str | None = None) -> RewardFn:
    """Import the function named by ``spec``; see the module docstring for the two forms. ``cwd`` stands in for
    the working directory (default: this process's)."""
    target, _, attr = spec.rpartition(":")  # rpartition: a Windows drive letter holds a colon too
    if not target or not attr:
        raise RewardFnError(f"reward fn spec {spec!r} is malformed; expected {SPEC_FORMS}")
    module = _import(spec, target, os.path.abspath(cwd or os.curdir))
    if not hasattr(module, attr):
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        close = difflib.get_close_matches(attr, callables, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"its callables are {callables}"
        raise RewardFnError(f"reward fn {spec!r}: module {target!r} has no attribute {attr!r}; {hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardFnError(
            f"reward fn {spec!r}: {attr!r} is a {type(fn).__name__}, not callable; "
            "point the spec at a function taking (problem, response)"
        )
    return fn


class RewardSpec:
    """A reward function that travels as its spec and is loaded, once, in each process that calls it."""

    def __init__(self, spec: str, cwd: str | None = None) -> None:
        self.spec = spec
        self.cwd = os.path.abspath(cwd or os.curdir)  # the driver's, also in a worker whose own may differ
        self._fn: RewardFn | None = None
        self._lock = threading.Lock()  # a reward worker may score on several threads

    def load(self) -> RewardFn:
        with self._lock:
            if self._fn is None:
                self._fn = load_reward_fn(self.spec, self.cwd)
            return self._fn

    def __call__(self, problem: Problem, response: str) -> Any:
        return self.load()(problem, response)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return RewardSpec, (self.spec, self.cwd)  # not the function: the receiver loads its own

    def __repr__(self) -> str:
        return f"RewardSpec({self.spec!r}, cwd={self.cwd!r})"


def check_reward(task: Task, seed: int) -> None:
    """Score the first training problem's reference answer once, here, so that a reward function that cannot be
    called stops the run in its first seconds rather than after the model is built and warmed up.

    Only that the call works is checked, not its value: a reward need not give the reference full marks.
    """
    problem = next(iter(task.train_problems(seed)))
    try:
        task.verify(problem, task.reference(problem))
    except RewardFnError as e:
        note = "(checked before training: the first training problem, its reference answer as the response)"
        raise RewardFnError(f"{e.message} {note}", e.detail) from e


def _clip(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _sample(problem: Problem, response: str) -> str:
    return f"prompt {_clip(problem.prompt)}, answer {_clip(problem.answer)}, response {_clip(response)}"


def call_reward_fn(fn: RewardFn, name: str, problem: Problem, response: str, index: int) -> RewardResult:
    """Score one response. A real number ``x`` becomes ``RewardResult(float(x), {"reward": float(x)})``.

    ``name`` (the spec) and ``index`` (the sample's position, for the user to find it) only feed error messages,
    which also name the sample's text and, for an exception, the line that raised it.
    """
    try:
        out = fn(problem, response)
    except Exception as e:
        frame = traceback.extract_tb(e.__traceback__)[-1]  # the innermost: where it was raised
        raise RewardFnError(
            f"reward fn {name!r} raised {type(e).__name__} on sample {index}: {e}",
            f"raised at {frame.filename}:{frame.lineno} in {frame.name}, on {_sample(problem, response)}",
        ) from e
    if isinstance(out, RewardResult):
        reward = out.reward
    elif isinstance(out, numbers.Real):  # bool, int, float and numpy scalars
        reward = float(out)
        out = RewardResult(reward, {"reward": reward})
    else:
        raise RewardFnError(
            f"reward fn {name!r} returned {type(out).__name__} on sample {index}; "
            "expected a float, int, bool or RewardResult",
            f"the sample: {_sample(problem, response)}",
        )
    if not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise RewardFnError(
            f"reward fn {name!r} returned a reward of {reward!r} on sample {index}; rewards must be finite numbers",
            f"the sample: {_sample(problem, response)}",
        )
    return out
