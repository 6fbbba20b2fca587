"""The ledger: every sample's life written down by the controller, and the check that reads it back."""

import json

import pytest
from test_controller import B, FakeReward, make_controller
from test_controller_stages import NoSignalReward, controller

from rollflow.cli import main
from rollflow.recipes.grpo import has_signal
from rollflow.runtime.ledger import Ledger, check


def write(path, events):
    path.write_text("".join(json.dumps({"event": e, "uid": u}) + "\n" for e, u in events))
    return path


def test_check_finds_what_breaks_the_invariant(tmp_path):
    events = [("admitted", 0), ("admitted", 1), ("admitted", 2), ("admitted", 3),
              ("trained", 0), ("trained", 0), ("dropped", 1), ("trained", 9)]
    report = check(write(tmp_path / "ledger.jsonl", events))
    assert report.trained_twice == [0] and report.trained_unknown == [9] and report.unaccounted == [2, 3]
    assert not report.clean
    assert report.summary().splitlines() == [
        "ledger NOT clean: 4 admitted, 0 produced, 0 retried, 0 readmitted, 0 hung, 1 dropped, 3 trained, 0 unfinished; "
        "2 lost", "trained more than once: 0", "trained but never admitted: 9",
        "admitted but neither trained, dropped nor unfinished at the end (lost): 2, 3"]


def test_check_names_the_line_that_is_not_an_event(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event": "admitted", "uid": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"ledger.jsonl:2: not a ledger event"):
        check(path)


def test_a_run_with_retries_writes_a_clean_ledger_that_tells_each_sample_s_life(tokenizer, tmp_path):
    path = tmp_path / "ledger.jsonl"
    c, *_ = make_controller(tokenizer, FakeReward(flaky={4}, times=1), eta=1)
    c.ledger = Ledger(path)
    list(c.run(3))
    c.ledger.close()
    report = check(path)
    assert report.clean and report.unaccounted == []
    assert report.counts == {"admitted": 3 * B, "produced": 2 * 3 * B, "retried": 1, "trained": 3 * B}
    life = [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["uid"] == 4]
    assert [(e["event"], e.get("column")) for e in life] == [
        ("admitted", None), ("produced", "trajectory"), ("retried", "reward"), ("produced", "reward"), ("trained", None)]
    assert life[2]["why"] == "infra_error" and life[-1]["step"] == 2  # its group, re-scored, went in step 2


def test_dropped_groups_are_in_the_ledger_with_why(tokenizer, tmp_path):
    path = tmp_path / "ledger.jsonl"
    c, _, store = controller(tokenizer, NoSignalReward({0}), keep_group=has_signal, max_dropped=10)
    c.ledger = Ledger(path)
    list(c.run(1))
    c.ledger.close()
    report = check(path)
    assert report.clean and report.counts["dropped"] == 3 and report.counts["trained"] == B
    dropped = [json.loads(line) for line in path.read_text().splitlines() if '"dropped"' in line]
    assert {e["why"] for e in dropped} == {"filtered (keep_group)"} and {e["uid"] for e in dropped} == {0, 1, 2}


def test_cli_ledger_check(tmp_path, capsys):
    write(tmp_path / "ledger.jsonl", [("admitted", 0), ("trained", 0)])
    assert main(["ledger", "check", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ledger clean: 1 admitted")
    write(tmp_path / "ledger.jsonl", [("admitted", 0), ("trained", 0), ("trained", 0)])
    assert main(["ledger", "check", str(tmp_path)]) == 1
    assert main(["ledger", "check", str(tmp_path / "nowhere")]) == 2
    assert "no ledger at" in capsys.readouterr().err


def test_a_resume_voids_the_work_after_its_checkpoint_and_a_line_cut_by_the_crash(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write(path, [("admitted", 0), ("admitted", 1), ("trained", 0)])
    checkpoint_bytes = path.stat().st_size
    with open(path, "a") as f:  # after the checkpoint: uid 1 trained, uid 2 admitted, then a kill -9 mid-line
        f.write('{"event": "trained", "uid": 1}\n{"event": "admitted", "uid": 2}\n{"event": "trai')
    assert not check(path).trained_twice  # before the resume: only the cut line, the last, is skipped
    ledger = Ledger(path, append=True)  # the resumed run: ends the cut line, voids what the checkpoint does not hold
    ledger.resumed(step=1, void_from=checkpoint_bytes)
    ledger.record("trained", 1, step=2)
    ledger.close()
    report = check(path)
    assert report.clean and report.resumes == 1 and report.void_lines == 2
    assert report.counts == {"admitted": 2, "trained": 2}  # uid 1 trained once, uid 2 never admitted (voided)
    ledger = Ledger(path, append=True)  # a second resume to the same checkpoint, after uid 1 was trained again
    ledger.resumed(step=1, void_from=checkpoint_bytes)
    ledger.record("trained", 1, step=2)
    ledger.close()
    assert check(path).clean and check(path).counts["trained"] == 2


def test_a_sample_trained_twice_across_a_resume_is_caught(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write(path, [("admitted", 0), ("trained", 0)])
    ledger = Ledger(path, append=True)
    ledger.resumed(step=1, void_from=path.stat().st_size)  # the checkpoint already holds uid 0 as trained
    ledger.record("trained", 0, step=2)
    ledger.close()
    assert check(path).trained_twice == [0]


def test_rows_in_flight_at_the_end_are_unfinished_not_lost(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write(path, [("admitted", 0), ("admitted", 1), ("trained", 0)])
    assert check(path).unaccounted == [1] and not check(path).clean
    write(path, [("admitted", 0), ("admitted", 1), ("trained", 0), ("unfinished", 1)])
    assert check(path).clean
