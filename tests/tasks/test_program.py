"""The `program` task: references, the demonstrator's bugs, and programs scored by running them in the sandbox with
partial credit (outcome classes, stages, the sandbox's own failure as an infrastructure fault)."""

import pickle
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rollflow.api import Status
from rollflow.envs.sandbox import SandboxError
from rollflow.tasks.program import OPS, ProgramTask


@pytest.fixture(scope="module")
def task():
    return ProgramTask(timeout_s=3.0)


def problem(task, op):
    rng = random.Random(0)
    while (p := task.sample(rng)).meta["op"] != op:
        pass
    return p


@pytest.mark.parametrize("op", sorted(OPS))
def test_the_right_program_scores_one_and_reaches_both_stages(task, op):
    p = problem(task, op)
    right = f"x=[{','.join(map(str, p.meta['xs']))}];{OPS[op][0]}"
    result = task.verify(p, right)
    assert (result.reward, result.status) == (1.0, Status.OK)
    assert result.breakdown["task_score"] == 1.0 and result.breakdown["stages"] == 2.0


def test_outcomes_and_partial_credit(task):
    p = problem(task, "sort")  # e.g. "sort 3 9 4"
    xs = ",".join(map(str, p.meta["xs"]))
    wrong = task.verify(p, f"x=[{xs}];print(x.sort())")  # runs, prints None
    assert (wrong.reward, wrong.status) == (0.0, Status.OK)
    crashed_late = task.verify(p, f"x=[{xs}];print(x.max())")  # AttributeError after the data stage
    assert crashed_late.reward == pytest.approx(-1.0 + 0.1) and crashed_late.status is Status.AGENT_ERROR
    crashed_early = task.verify(p, "x=[1;print(x)")  # does not even parse: no stage
    assert crashed_early.reward == -1.0 and crashed_early.status is Status.AGENT_ERROR
    looping = task.verify(p, f"x=[{xs}];print(x)\nwhile 1:pass")
    assert looping.status is Status.AGENT_ERROR and looping.reward == pytest.approx(-1.0 + 0.2)
    assert looping.breakdown["run_s"] >= 2.5  # killed at the task's 3 s timeout


def test_the_demonstrator_writes_its_bugs_on_the_buggy_operations_only(task):
    rng = random.Random(1)
    bugs: dict[str, list[bool]] = {op: [] for op in OPS}
    for _ in range(600):
        p = task.sample(rng)
        bugs[p.meta["op"]].append(task.reference(p).endswith(OPS[p.meta["op"]][1]) and
                                  OPS[p.meta["op"]][0] != OPS[p.meta["op"]][1])
        assert task.reference(p) == task.reference(p)  # seeded by the problem
    for op, seen in bugs.items():
        share = sum(seen) / len(seen)
        assert (0.45 < share < 0.75) if op in task.buggy_ops else share == 0.0, (op, share)


def test_programs_run_concurrently_from_reward_threads(task):
    p = problem(task, "sum")
    slow = f"import time;time.sleep(0.5);x=[{','.join(map(str, p.meta['xs']))}];print(sum(x))"
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: task.verify(p, slow), range(8)))
    wall = time.perf_counter() - started
    assert [r.reward for r in results] == [1.0] * 8
    ran = sum(r.breakdown["run_s"] for r in results)
    assert ran >= 8 * 0.5 and wall < 0.5 * ran  # each ran its half second, side by side


def test_a_sandbox_that_cannot_run_is_an_infrastructure_fault(task, monkeypatch):
    p = problem(task, "sum")

    def broken(source, stdin=""):
        raise SandboxError("unshare failed")

    monkeypatch.setattr(task.sandbox, "run", broken)
    result = task.verify(p, "print(1)")
    assert result.status is Status.INFRA_ERROR and result.breakdown == {"sandbox_error": 1.0}


def test_the_task_pickles_without_its_sandbox():
    task = ProgramTask()
    assert task.sandbox.isolation in ("bwrap", "namespaces", "rlimits")  # probed here
    copy = pickle.loads(pickle.dumps(task))
    assert "sandbox" not in copy.__dict__ and copy.limits == task.limits


def test_a_model_instrumenter_is_used_when_configured_and_its_share_reported(task, tmp_path, monkeypatch):
    from rollflow.envs.instrument import ModelInstrumenter

    p = problem(task, "sum")
    right = f"x=[{','.join(map(str, p.meta['xs']))}];{OPS['sum'][0]}"
    by_model = ProgramTask(timeout_s=3.0, instrumenter=str(tmp_path))  # never loaded: replaced below
    careful = ModelInstrumenter(lambda prompt: by_model.rules.instrument(right, ("data", "printed")), by_model.rules)
    monkeypatch.setitem(by_model.__dict__, "model_instrumenter", careful)
    kept = by_model.verify(p, right)
    assert (kept.reward, kept.breakdown["instrumented_by_model"], kept.breakdown["stages"]) == (1.0, 1.0, 2.0)
    careless = ModelInstrumenter(lambda prompt: right.replace("sum", "max"), by_model.rules)  # changed the program
    monkeypatch.setitem(by_model.__dict__, "model_instrumenter", careless)
    dropped = by_model.verify(p, right)  # the rules' markers instead: the policy's own program ran
    assert (dropped.reward, dropped.breakdown["instrumented_by_model"], dropped.breakdown["stages"]) == (1.0, 0.0, 2.0)
    assert "instrumented_by_model" not in task.verify(p, right).breakdown  # the rules: nothing to report
    assert "model_instrumenter" not in pickle.loads(pickle.dumps(by_model)).__dict__  # each process loads its own


def test_the_instrumenter_setting_is_checked_and_a_relative_path_made_absolute(tmp_path, monkeypatch):
    from rollflow.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"task.instrumenter='nowhere' is neither 'rules' nor a Hugging Face"):
        load_config(overrides=["task.name=program", "task.instrumenter=nowhere"])
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    config = load_config(overrides=["task.name=program", "task.instrumenter=ckpt"])
    assert config.task.instrumenter == str(tmp_path / "ckpt")
