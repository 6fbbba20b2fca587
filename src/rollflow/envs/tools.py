"""Tools an agent calls in its text: registered Python functions, a declared call format, and an environment.

``Tools`` holds the functions (``@tools.register``); a ``ToolFormat`` finds a call in a model turn; ``ToolEnv`` is
the ``api.Env`` that runs the call and shows the result as the next observation, or, when the turn holds no call,
takes it as the final answer and scores it. A call the model wrote badly (an unknown tool, wrong arguments, text
that starts a call and does not finish it) is not an infrastructure fault: the error is fed back to the model as the
observation, in words that say what to write instead, and the step's status is ``agent_error``. A tool that raises is
reported the same way (the agent asked for something the tool could not do).

Two formats ship: ``CallFormat`` (``name(arg, ...)`` with Python literal arguments, the whole turn; compact enough
for a character-level model) and ``TaggedJsonFormat`` (``<tool>{"name": ..., "arguments": {...}}</tool>``
anywhere in the turn, the usual form for instruction-tuned models).
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rollflow.api import Status, StepResult


class MalformedCall(ValueError):
    """A model turn that tried to call a tool and did not manage; the message is shown to the model."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class ToolFormat(Protocol):
    def parse(self, text: str) -> ToolCall | None:
        """The call in a model turn, None when it holds none (a final answer); ``MalformedCall`` when it holds a
        broken one."""
        ...

    def example(self, name: str, params: list[str]) -> str:
        """How a call of ``name`` with ``params`` is written in this format (for tool descriptions and errors)."""
        ...


_NAME = r"[A-Za-z_]\w*"


class CallFormat:
    """The whole turn is ``name(arg, ...)``: Python literals (numbers, strings, lists, …), positional or ``key=value``.
    A turn that starts with ``name(`` and is not such a call is malformed; any other text is a final answer."""

    def parse(self, text: str) -> ToolCall | None:
        text = text.strip()
        start = re.match(rf"({_NAME})\(", text)
        if start is None:
            return None
        if not text.endswith(")"):
            raise MalformedCall(f"a call must end with ')' and nothing after it, like {start.group(1)}(...)")
        try:
            node = ast.parse(text, mode="eval").body
        except SyntaxError:
            raise MalformedCall(f"could not read the arguments of {start.group(1)}(...): write Python literals, "
                                "e.g. numbers or 'strings', separated by commas") from None
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise MalformedCall(f"write one call and nothing else, like {start.group(1)}(...)")
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg is not None}
        except ValueError:
            raise MalformedCall(f"arguments of {node.func.id}(...) must be literal values (numbers, 'strings', "
                                "lists), not expressions or names") from None
        return ToolCall(node.func.id, args, kwargs)

    def example(self, name: str, params: list[str]) -> str:
        return f"{name}({', '.join(params)})"


class TaggedJsonFormat:
    """``<tool>{"name": "lookup", "arguments": {"key": "x"}}</tool>`` anywhere in the turn (the first one counts)."""

    open, close = "<tool>", "</tool>"

    def parse(self, text: str) -> ToolCall | None:
        if self.open not in text:
            return None
        body = text.split(self.open, 1)[1]
        if self.close not in body:
            raise MalformedCall(f"a tool call must end with {self.close}")
        try:
            call = json.loads(body.split(self.close, 1)[0])
        except json.JSONDecodeError as e:
            raise MalformedCall(f"the tool call is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise MalformedCall('a tool call is a JSON object with a "name" string and an "arguments" object')
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            raise MalformedCall('"arguments" must be a JSON object of parameter names to values')
        return ToolCall(call["name"], (), arguments)

    def example(self, name: str, params: list[str]) -> str:
        args = ", ".join(f'"{p}": ...' for p in params)
        return f'{self.open}{{"name": "{name}", "arguments": {{{args}}}}}{self.close}'


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    description: str

    @property
    def params(self) -> list[str]:
        return list(inspect.signature(self.fn).parameters)


class Tools:
    """A registry of the functions an agent may call. Tools may be plain functions (run in a thread, so a slow one
    does not hold up other episodes) or coroutine functions; each returns what the model is shown (``str()`` of it)."""

    def __init__(self, fmt: ToolFormat | None = None) -> None:
        self.format: ToolFormat = fmt or CallFormat()
        self._tools: dict[str, Tool] = {}

    def register(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
                 description: str | None = None) -> Any:
        """``@tools.register`` or ``tools.register(fn, name=...)``; the description defaults to the docstring's
        first line."""

        def add(f: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or f.__name__
            if not re.fullmatch(_NAME, tool_name):
                raise ValueError(f"tool name {tool_name!r} must be an identifier (letters, digits, _)")
            if tool_name in self._tools:
                raise ValueError(f"a tool named {tool_name!r} is already registered")
            doc = description if description is not None else (inspect.getdoc(f) or "").split("\n")[0]
            self._tools[tool_name] = Tool(tool_name, f, doc)
            return f

        return add if fn is None else add(fn)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def describe(self) -> str:
        """One line per tool: how to call it, and what it does."""
        return "\n".join(f"{self.format.example(t.name, t.params)}: {t.description}" for t in self._tools.values())

    async def call(self, call: ToolCall) -> str:
        """Run ``call``; ``MalformedCall`` for an unknown tool or arguments that do not fit its parameters, or when
        the tool raises."""
        tool = self._tools.get(call.name)
        if tool is None:
            raise MalformedCall(f"there is no tool {call.name!r}; the tools are: "
                                f"{', '.join(self.format.example(t.name, t.params) for t in self._tools.values())}")
        try:
            inspect.signature(tool.fn).bind(*call.args, **call.kwargs)
        except TypeError as e:
            raise MalformedCall(f"{e}; call it as {self.format.example(tool.name, tool.params)}") from None
        try:
            if inspect.iscoroutinefunction(tool.fn):
                result = await tool.fn(*call.args, **call.kwargs)
            else:
                result = await asyncio.to_thread(tool.fn, *call.args, **call.kwargs)
        except Exception as e:
            raise MalformedCall(f"{tool.name} failed: {type(e).__name__}: {e}") from e
        return str(result)


class ToolEnv:
    """``api.Env``: each model turn either calls a tool (the result is the next observation) or is the final answer,
    scored by ``score(task, answer)`` (a float, or a ``(reward, status)`` pair), which ends the episode. ``prompt(task)``
    is the first observation; with ``show_tools`` the tools' descriptions follow it. ``error(message)`` is what the
    model is shown for a malformed call (a model with a small vocabulary or context may need a shorter form; the
    full message is kept in the step's ``info["error"]``)."""

    def __init__(self, tools: Tools, prompt: Callable[[Any], str],
                 score: Callable[[Any, str], float | tuple[float, Status] | Awaitable[float]],
                 show_tools: bool = False, error: Callable[[str], str] = "error: {}".format) -> None:
        self.tools, self.prompt, self.score = tools, prompt, score
        self.show_tools, self.error = show_tools, error
        self.task: Any = None
        self.calls = 0

    async def reset(self, task: Any) -> str:
        self.task, self.calls = task, 0
        text = self.prompt(task)
        return f"{text}\n{self.tools.describe()}" if self.show_tools else text

    async def step(self, action: str) -> StepResult:
        started = time.perf_counter()
        try:
            call = self.tools.format.parse(action)
            if call is not None:
                self.calls += 1
                observation = await self.tools.call(call)
                return StepResult(observation, info={"duration_s": time.perf_counter() - started, "tool": call.name})
        except MalformedCall as e:
            return StepResult(self.error(str(e)), info={
                "duration_s": time.perf_counter() - started, "status": Status.AGENT_ERROR.value, "error": str(e)})
        verdict = self.score(self.task, action)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        reward, status = verdict if isinstance(verdict, tuple) else (float(verdict), Status.OK)
        return StepResult("", reward, True, {"duration_s": time.perf_counter() - started, "status": Status(status).value,
                                             "tool_calls": self.calls})
