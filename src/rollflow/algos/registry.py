"""Name → function registries. Algorithms are chosen by name from config and dispatched only through these."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Filled once at import time by ``@register``; never mutated afterwards."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{name!r} is registered twice among {self.kind}")
            self._fns[name] = fn
            self._docs[name] = next(iter((fn.__doc__ or "").strip().splitlines()), "")
            return fn

        return add

    def get(self, name: str) -> F:
        if name not in self._fns:
            close = difflib.get_close_matches(name, self._fns, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown name {name!r} among {self.kind}; registered: {', '.join(sorted(self._fns))}.{hint}")
        return self._fns[name]

    def names(self) -> list[str]:
        return sorted(self._fns)

    def describe(self) -> dict[str, str]:
        """Name → first line of the function's docstring."""
        return dict(sorted(self._docs.items()))


ADVANTAGES: Registry = Registry("advantage estimators")
POLICY_LOSSES: Registry = Registry("policy losses")
AGGREGATIONS: Registry = Registry("loss aggregations")
CORRECTIONS: Registry = Registry("off-policy corrections")
KL_ESTIMATORS: Registry = Registry("KL estimators")
