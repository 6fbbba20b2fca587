"""Partial credit: a failed run earns its penalty plus the credit of the stages its markers say it reached; a run that
completed earns its task score. Values are hand-computed; stage_credit=0.25 keeps them exact in binary."""

from dataclasses import dataclass

import pytest

from rollflow.api import RewardResult, Status
from rollflow.tasks.partial_credit import PartialCredit, marker, score_run, stages_reached, strip_markers

STAGES = ("loaded_data", "built_model", "trained", "wrote_answer")
CREDIT = PartialCredit(STAGES, fail_penalty=-10.0, stage_credit=0.25)


def out(*lines):
    return "".join(line + "\n" for line in lines)


def test_marker_is_a_flushed_print_of_its_line():
    assert marker("trained") == "print('@@stage trained', flush=True)"
    for bad in ("", "two words", "tab\there", "new\nline"):
        with pytest.raises(ValueError, match="without whitespace"):
            marker(bad)


def test_stages_reached_in_declared_order_once_each_ignoring_undeclared_and_inline_markers():
    stdout = out("@@stage trained", "epoch 1", "@@stage loaded_data", "@@stage loaded_data", "@@stage tuned",
                 "x @@stage built_model", "@@stage wrote_answer extra", "  @@stage wrote_answer\r")
    assert stages_reached(stdout, STAGES) == ["loaded_data", "trained", "wrote_answer"]
    assert stages_reached("", STAGES) == []


def test_strip_markers_keeps_every_other_line_byte_for_byte():
    stdout = "@@stage loaded_data\nacc 0.5\r\n@@stage undeclared\n  \n@@stage trained\r\nlast"
    assert strip_markers(stdout) == "acc 0.5\r\n  \nlast"
    assert strip_markers("no markers\n") == "no markers\n"


@pytest.mark.parametrize("lines, reward, n", [
    ((), -10.0, 0),
    (("@@stage loaded_data", "loss 3.2", "@@stage built_model"), -9.5, 2),
    (("@@stage loaded_data", "@@stage built_model", "@@stage trained", "Traceback"), -9.25, 3),
])
def test_failed_run_gets_penalty_plus_credit_per_stage(lines, reward, n):
    result = CREDIT.score(False, out(*lines), None)
    assert result == RewardResult(reward, {"failed": -10.0, "stages": n, "stage_credit": 0.25 * n, "task_score": 0.0})


def test_defaults_are_the_papers():
    credit = PartialCredit(STAGES)
    assert (credit.fail_penalty, credit.stage_credit) == (-10.0, 0.1)
    assert credit.score(False, out("@@stage loaded_data", "@@stage built_model"), None).reward == -10.0 + 0.1 * 2


def test_completed_run_gets_its_task_score_and_no_stage_credit():
    result = CREDIT.score(True, out("@@stage loaded_data", "@@stage trained", "0.75"), 0.75)
    assert result == RewardResult(0.75, {"failed": 0.0, "stages": 2, "stage_credit": 0.0, "task_score": 0.75})


def test_completed_run_with_nothing_to_grade_gets_stage_credit_without_penalty():
    result = CREDIT.score(True, out("@@stage loaded_data", "@@stage built_model", "@@stage trained"), None)
    assert result == RewardResult(0.75, {"failed": 0.0, "stages": 3, "stage_credit": 0.75, "task_score": 0.0})


def test_undeclared_and_repeated_markers_earn_nothing_more():
    stdout = out("@@stage loaded_data", "@@stage loaded_data", "@@stage hacked", "@@stage hacked2")
    assert CREDIT.score(False, stdout, None).reward == -9.75


def test_status_passes_through_and_failed_runs_are_not_graded():
    assert CREDIT.score(False, "", None, Status.AGENT_ERROR).status is Status.AGENT_ERROR
    assert CREDIT.score(True, "", 1.0).status is Status.OK
    with pytest.raises(ValueError, match="failed run is not graded"):
        CREDIT.score(False, "", 0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"stages": ("a", "a")}, "names a stage twice"),
    ({"stages": ("two words",)}, "without whitespace"),
    ({"stages": ("a",), "stage_credit": -0.1}, "stage_credit >= 0"),
    ({"stages": ("a",), "fail_penalty": float("nan")}, "finite fail_penalty"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PartialCredit(**kwargs)


@dataclass
class Run:
    status: str
    stdout: str
    exit_code: int | None = 0
    duration_s: float = 0.1


RAN_TWO = out("@@stage loaded_data", "rows 3", "@@stage built_model")


@pytest.mark.parametrize("status", ["error", "timeout", "memory", "killed", "output_limit"])
def test_score_run_penalises_every_failed_status_and_never_grades_it(status):
    graded = []
    result = score_run(CREDIT, Run(status, RAN_TWO, exit_code=1), lambda s: graded.append(s) or 1.0)
    assert result.reward == -9.5 and result.breakdown["stages"] == 2
    assert graded == []


def test_score_run_grades_a_completed_run_on_its_stdout_without_markers():
    graded = []
    result = score_run(CREDIT, Run("ok", RAN_TWO + "answer 42\n"), lambda s: graded.append(s) or 0.5)
    assert graded == ["rows 3\nanswer 42\n"]
    assert result == RewardResult(0.5, {"failed": 0.0, "stages": 2, "stage_credit": 0.0, "task_score": 0.5})
    assert score_run(CREDIT, Run("ok", RAN_TWO), lambda s: None).reward == 0.5  # nothing to grade: 2 stages × 0.25


def test_score_run_passes_status_and_refuses_an_unknown_sandbox_status():
    assert score_run(CREDIT, Run("timeout", ""), lambda s: 1.0, Status.TIMEOUT).status is Status.TIMEOUT
    with pytest.raises(ValueError, match="sandbox status 'crashed' is none of"):
        score_run(CREDIT, Run("crashed", ""), lambda s: 1.0)
