import json
import threading
import time

import pytest

from rollflow.runtime.trace import Tracer

# Epoch second 1000 is long before any Tracer is built, so t0 is the earliest event and ts values are hand-checkable.
T = 1000.0


def load(tracer: Tracer, tmp_path) -> list[dict]:
    path = tracer.write(tmp_path / "trace.json")
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ms"
    return doc["traceEvents"]


def body(events: list[dict]) -> list[dict]:
    return [e for e in events if e["ph"] != "M"]


def test_span_instant_counter_phases_and_times(tmp_path):
    tr = Tracer()
    tr.span("rollout/0", "generate", T + 0.5, T + 1.75, tokens=128)
    tr.instant("trainer", "weights_synced", T + 2.0, version=3)
    tr.counter("queue", T, depth=4.0, inflight=2.0)
    assert len(tr) == 3
    events = body(load(tr, tmp_path))
    assert [e["ph"] for e in events] == ["C", "X", "i"]  # sorted by ts
    counter, span, instant = events
    assert span == {
        "ph": "X", "name": "generate", "pid": 1, "tid": 1, "ts": 500_000.0, "dur": 1_250_000.0, "args": {"tokens": 128}
    }
    assert instant == {
        "ph": "i", "s": "t", "name": "weights_synced", "pid": 1, "tid": 2, "ts": 2_000_000.0, "args": {"version": 3}
    }
    assert counter == {"ph": "C", "name": "queue", "pid": 1, "ts": 0.0, "args": {"depth": 4.0, "inflight": 2.0}}


def test_times_are_relative_to_earliest_event_without_float_noise(tmp_path):
    tr = Tracer()
    tr.span("a", "x", T + 0.3, T + 0.4)
    tr.instant("a", "first", T + 0.1)
    events = body(load(tr, tmp_path))
    assert [e["ts"] for e in events] == [0.0, 200_000.0]  # sorted by ts, not by recording order
    assert events[1]["dur"] == 100_000.0


def test_events_after_construction_are_relative_to_construction(tmp_path):
    tr = Tracer()
    now = time.time()  # >= the tracer's t0, taken a moment earlier
    tr.instant("a", "later", now + 2.5)
    (e,) = body(load(tr, tmp_path))
    assert 2_500_000.0 <= e["ts"] < 3_500_000.0


def test_tracks_get_distinct_tids_and_metadata_in_first_seen_order(tmp_path):
    tr = Tracer(process="my-run")
    tr.span("trainer", "step", T + 5, T + 6)
    tr.span("rollout/0", "generate", T + 1, T + 2)
    tr.instant("trainer", "sync", T + 6)
    tr.span("reward/0", "score", T + 3, T + 4)
    events = load(tr, tmp_path)
    n_meta = 1 + 2 * 3
    assert all(e["ph"] == "M" for e in events[:n_meta])
    assert all(e["ph"] != "M" for e in events[n_meta:])
    assert events[0] == {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "my-run"}}
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {1: "trainer", 2: "rollout/0", 3: "reward/0"}
    sort = {e["tid"]: e["args"]["sort_index"] for e in events if e["name"] == "thread_sort_index"}
    assert sort == {1: 1, 2: 2, 3: 3}
    assert [(e["name"], e["tid"]) for e in body(events)] == [("generate", 2), ("score", 3), ("step", 1), ("sync", 1)]


def test_span_ending_before_start_names_track_and_span():
    tr = Tracer()
    with pytest.raises(ValueError, match=r"span 'generate' on track 'rollout/3' ends before it starts"):
        tr.span("rollout/3", "generate", T + 2, T + 1)
    assert len(tr) == 0


def test_zero_length_span_is_allowed(tmp_path):
    tr = Tracer()
    tr.span("a", "blip", T, T)
    assert body(load(tr, tmp_path))[0]["dur"] == 0.0


def test_non_scalar_arg_is_rejected_on_record():
    tr = Tracer()
    with pytest.raises(TypeError, match=r"arg 'ids' is a list"):
        tr.span("a", "x", T, T + 1, ids=[1, 2])
    assert len(tr) == 0


def test_disabled_tracer_records_nothing_and_writes_empty_valid_trace(tmp_path):
    tr = Tracer(enabled=False)
    tr.span("a", "x", T, T + 1)
    tr.span("a", "backwards", T + 1, T)  # a no-op, so no error either
    tr.instant("a", "y", T)
    tr.counter("q", T, depth=1.0)
    assert len(tr) == 0
    events = load(tr, tmp_path / "nested" / "dir")
    assert events == [{"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "rollflow"}}]


def test_concurrent_recording_from_8_threads_loses_no_event(tmp_path):
    tr = Tracer()
    n_threads, per_thread = 8, 500
    barrier = threading.Barrier(n_threads)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per_thread):
            tr.span(f"worker/{i}", "step", T + j, T + j + 1, j=j)
            tr.counter("progress", T + j, **{f"w{i}": float(j)})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tr) == 2 * n_threads * per_thread
    events = load(tr, tmp_path)
    assert len(body(events)) == 2 * n_threads * per_thread
    tids = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert sorted(tids.values()) == list(range(1, n_threads + 1))
    for i in range(n_threads):
        assert sum(1 for e in body(events) if e.get("tid") == tids[f"worker/{i}"]) == per_thread
    assert all(e["dur"] == 1_000_000.0 for e in body(events) if e["ph"] == "X")  # no span torn by a race
