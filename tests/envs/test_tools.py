"""Tools called in a model's text: the two call formats, the registry's errors fed back to the model, the tool
environment's steps, and ``as_async`` for synchronous environments."""

import asyncio
import threading
import time

import pytest

from rollflow.api import Status, StepResult
from rollflow.envs.tools import CallFormat, MalformedCall, TaggedJsonFormat, ToolCall, ToolEnv, Tools
from rollflow.envs.wrap import as_async


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("text, call", [
    ("lookup('paris')", ToolCall("lookup", ("paris",))),
    ("  add(2, 3) ", ToolCall("add", (2, 3))),
    ("add(a=2, b=[1, 2])", ToolCall("add", (), {"a": 2, "b": [1, 2]})),
    ("the answer is 5", None),
    ("5", None),
])
def test_call_format_reads_calls_and_leaves_answers(text, call):
    assert CallFormat().parse(text) == call


@pytest.mark.parametrize("text, says", [
    ("add(2, 3", "must end with '\\)'"),
    ("add(2, 3) and more", "must end with '\\)'"),
    ("add(2,, 3)", "could not read the arguments"),
    ("add(x, 3)", "must be literal values"),
    ("add(2)(3)", "write one call"),
])
def test_call_format_names_what_is_wrong(text, says):
    with pytest.raises(MalformedCall, match=says):
        CallFormat().parse(text)


def test_tagged_json_format():
    fmt = TaggedJsonFormat()
    assert fmt.parse('thinking <tool>{"name": "lookup", "arguments": {"key": "x"}}</tool>') == ToolCall("lookup", (), {"key": "x"})
    assert fmt.parse("no call here") is None
    for text, says in [('<tool>{"name": "a"', "must end with </tool>"), ("<tool>{name}</tool>", "not valid JSON"),
                       ('<tool>{"arguments": {}}</tool>', '"name" string'),
                       ('<tool>{"name": "a", "arguments": [1]}</tool>', '"arguments" must be a JSON object')]:
        with pytest.raises(MalformedCall, match=says):
            fmt.parse(text)
    assert fmt.example("lookup", ["key"]) == '<tool>{"name": "lookup", "arguments": {"key": ...}}</tool>'


def make_tools():
    tools = Tools()

    @tools.register
    def add(a, b):
        """Add two numbers."""
        return a + b

    @tools.register(name="slow")
    async def wait(seconds):
        await asyncio.sleep(seconds)
        return "done"

    @tools.register
    def divide(a, b):
        return a / b

    return tools


def test_registry_describes_calls_and_runs_sync_and_async_tools():
    tools = make_tools()
    assert tools.describe().splitlines() == ["add(a, b): Add two numbers.", "slow(seconds): ", "divide(a, b): "]
    assert run(tools.call(ToolCall("add", (2, 3)))) == "5"
    assert run(tools.call(ToolCall("slow", (0.01,)))) == "done"
    with pytest.raises(ValueError, match="already registered"):
        tools.register(lambda: 0, name="add")
    with pytest.raises(ValueError, match="must be an identifier"):
        tools.register(lambda: 0, name="no spaces")


@pytest.mark.parametrize("call, says", [
    (ToolCall("mul", (2, 3)), "there is no tool 'mul'; the tools are: add\\(a, b\\), slow\\(seconds\\), divide\\(a, b\\)"),
    (ToolCall("add", (2,)), "missing a required argument: 'b'; call it as add\\(a, b\\)"),
    (ToolCall("add", (1, 2, 3)), "too many positional arguments; call it as add\\(a, b\\)"),
    (ToolCall("divide", (1, 0)), "divide failed: ZeroDivisionError: division by zero"),
])
def test_registry_errors_say_what_to_write(call, says):
    with pytest.raises(MalformedCall, match=says):
        run(make_tools().call(call))


def test_a_sync_tool_runs_off_the_event_loop():
    tools = Tools()
    seen = []
    tools.register(lambda: seen.append(threading.current_thread() is threading.main_thread()) or "ok", name="where")
    assert run(tools.call(ToolCall("where"))) == "ok" and seen == [False]


def test_tool_env_feeds_results_and_errors_back_and_scores_the_answer():
    env = ToolEnv(make_tools(), prompt=lambda task: f"what is {task[0]}+{task[1]}?",
                  score=lambda task, answer: float(answer.strip() == str(sum(task))), show_tools=True)

    async def episode():
        first = await env.reset((2, 3))
        steps = [await env.step(a) for a in ["add(2, ", "mul(2, 3)", "add(2, 3)", " 5"]]
        return first, steps

    first, (broken, unknown, called, answer) = run(episode())
    assert first.splitlines()[0] == "what is 2+3?" and first.splitlines()[1] == "add(a, b): Add two numbers."
    assert broken.observation == "error: a call must end with ')' and nothing after it, like add(...)"
    assert not broken.done and broken.info["status"] == Status.AGENT_ERROR.value and broken.reward == 0.0
    assert unknown.observation.startswith("error: there is no tool 'mul'") and unknown.info["status"] == "agent_error"
    assert called == StepResult("5", 0.0, False, {"duration_s": called.info["duration_s"], "tool": "add"})
    assert answer.done and answer.reward == 1.0 and answer.info["status"] == "ok" and answer.info["tool_calls"] == 2


def test_tool_env_takes_a_status_from_the_scorer():
    env = ToolEnv(Tools(), prompt=str, score=lambda task, answer: (-1.0, Status.AGENT_ERROR))
    result = run(env.step("crash"))
    assert (result.reward, result.done, result.info["status"]) == (-1.0, True, "agent_error")


class SlowSyncEnv:
    def reset(self, task):
        return f"start {task}"

    def step(self, action):
        time.sleep(0.2)
        return StepResult(action.upper(), 1.0, True)


def test_as_async_runs_a_sync_env_in_threads_and_measures_its_steps():
    env = as_async(SlowSyncEnv())

    async def two_episodes_and_a_ticker():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        started = time.perf_counter()
        results = await asyncio.gather(env.step("a"), env.step("b"))
        took = time.perf_counter() - started
        t.cancel()
        return results, took, ticks

    (a, b), took, ticks = run(two_episodes_and_a_ticker())
    assert (a.observation, b.observation) == ("A", "B") and a.reward == 1.0 and a.done
    assert a.info["duration_s"] >= 0.19
    assert took < 0.35 and ticks >= 10  # both steps at once, and the loop kept running meanwhile
    assert run(env.reset(3)) == "start 3"


def test_as_async_keeps_async_envs_and_refuses_half_async_ones():
    from rollflow.testing import FakeTextEnv

    fake = FakeTextEnv()
    assert as_async(fake) is fake

    class Half:
        def reset(self, task):
            return ""

        async def step(self, action):
            return StepResult("")

    with pytest.raises(TypeError, match="both be async or both plain"):
        as_async(Half())


def test_as_async_refuses_a_step_that_returns_something_else():
    class Wrong:
        def reset(self, task):
            return ""

        def step(self, action):
            return ("obs", 0.0, True)

    with pytest.raises(TypeError, match="Wrong.step must return a StepResult, got tuple"):
        run(as_async(Wrong()).step("x"))
