import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rollflow.runtime.tracking import Tracker, plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_metrics(step: int) -> dict:
    return {
        "reward/mean": 0.1 * step, "reward/std": 0.05, "time/trajectory": 1.5,
        "throughput/samples_per_s": 32.0, "loss/kl": None,
        **({"eval/accuracy": 0.2 + 0.1 * step} if step % 2 == 0 else {}),
    }


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


@pytest.mark.parametrize("show_progress", [False, True])
def test_tracker_writes_run_dir(tmp_path, show_progress):
    run = tmp_path / "run"
    with Tracker(run, total_steps=5, show_progress=show_progress) as t:
        t.log_eval(0, 0.25, "initial")
        for step in range(5):
            t.log_step(step, fake_metrics(step))
            t.log_rollouts([{"step": step, "i": i, "text": "12+3=15"} for i in range(2)])
        t.log_eval(5, 0.75, "after RL")
        t.finish({"final_accuracy": 0.75, "steps": 5, "wall_s": 12.3456789})

    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[3]["reward/mean"] == pytest.approx(0.3)
    assert rows[3]["loss/kl"] is None
    assert rows[4]["eval/accuracy"] == pytest.approx(0.6) and "eval/accuracy" not in rows[3]

    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 10 and rollouts[-1] == {"step": 4, "i": 1, "text": "12+3=15"}

    assert json.loads((run / "summary.json").read_text()) == {
        "final_accuracy": 0.75, "steps": 5, "wall_s": 12.3456789}
    assert_png(run / "curves.png")

    tb = run / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert "loss/kl" not in acc.Tags()["scalars"]  # None is never sent to TensorBoard
    # eval/accuracy: 3 from log_step (steps 0, 2, 4) + 2 from log_eval
    assert len(acc.Scalars("eval/accuracy")) == 5


def test_exit_closes_without_summary_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(tmp_path, total_steps=3, show_progress=True) as t:
            t.log_step(0, {"reward/mean": 1.0})
            raise RuntimeError("boom")
    assert t._metrics.closed and t._rollouts.closed
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "curves.png").exists()
    t.close()  # second close is a no-op


def test_rejects_bad_metrics(tmp_path):
    with Tracker(tmp_path, total_steps=1, show_progress=False) as t:
        with pytest.raises(TypeError, match=r"'reward/mean' at step 0 is a str"):
            t.log_step(0, {"reward/mean": "high"})
        with pytest.raises(ValueError, match="clashes"):
            t.log_step(0, {"step": 3})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


@pytest.mark.parametrize("lines", [
    [],
    [{"step": 0, "reward/mean": 0.5}],
    [{"step": 0, "loss": 1.0}],
    [{"step": 0, "reward/mean": 0.5, "reward/std": 0.1, "eval/accuracy": 0.4}],
])
def test_plot_curves_edge_cases(tmp_path, lines):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    plot_curves(metrics, tmp_path / "a.png")
    plot_curves(metrics, tmp_path / "b.png", evals=[(0, 0.3, "initial")])
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "b.png")


def test_read_metrics_drops_cut_off_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_metrics(path)


def test_a_resume_within_the_second_of_the_last_event_file_still_purges_the_redone_steps(tmp_path):
    import time

    from rollflow.runtime.tracking import Resume

    with Tracker(tmp_path, total_steps=6, show_progress=False) as first:
        for step in range(1, 6):
            first.log_step(step, {"reward/mean": float(step)})
    # As if the first run's process had opened its file in the coming second with a higher pid than ours (a run
    # SIGKILLed moments after it started, resumed at once): TensorBoard reads files in name order.
    [written] = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    later = written.name.split(".")
    later[3], later[5] = str(int(time.time()) + 1), "999999999"
    written.rename(written.with_name(".".join(later)))
    with Tracker(tmp_path, total_steps=6, show_progress=False, resume=Resume(3, 0, 0)) as resumed:
        for step in range(4, 7):
            resumed.log_step(step, {"reward/mean": 10.0 * step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
