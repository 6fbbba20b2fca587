"""Checkpoint directories: whole or absent, the newest K kept."""

import json

import pytest

from rollflow.runtime.checkpoint import Checkpoints, read_meta


def writer(payload):
    def write(folder):
        (folder / "state.txt").write_text(payload)
        return {"payload": payload}
    return write


def test_save_writes_meta_last_and_keeps_the_newest(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    for step in (0, 5, 10):
        path = ckpts.save(step, writer(f"s{step}"))
        assert read_meta(path) == {"step": step, "written": read_meta(path)["written"], "payload": f"s{step}"}
    assert [p.name for p in ckpts.complete()] == ["step_000005", "step_000010"]
    assert (ckpts.latest() / "state.txt").read_text() == "s10"


def test_a_half_written_checkpoint_is_never_loaded_and_is_cleared_by_the_next_save(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=3)
    ckpts.save(1, writer("one"))
    with pytest.raises(RuntimeError, match="disk full"):  # a writer that dies midway leaves only a temporary folder
        ckpts.save(2, lambda folder: (folder / "state.txt").write_text("half") and (_ for _ in ()).throw(RuntimeError("disk full")))
    (tmp_path / "step_000003").mkdir()  # a folder without meta.json: not a checkpoint
    (tmp_path / "step_000004").mkdir()
    (tmp_path / "step_000004" / "meta.json").write_text('{"step": 4')  # cut off mid-write
    assert ckpts.latest().name == "step_000001"
    ckpts.save(5, writer("five"))
    assert not list(tmp_path.glob(".tmp-*")) and ckpts.latest().name == "step_000005"


def test_saving_a_step_again_replaces_it(tmp_path):
    ckpts = Checkpoints(tmp_path)
    ckpts.save(7, writer("periodic"))
    ckpts.save(7, writer("stopped"))
    assert [p.name for p in ckpts.complete()] == ["step_000007"]
    assert json.loads((tmp_path / "step_000007" / "meta.json").read_text())["payload"] == "stopped"
