"""A reward function named by a spec travels as the spec and is loaded where it is called; an unusable one is caught
by one call before training. (Loading and calling themselves are tested in test_file_task.py.)"""

import json
import pickle
import sys

import datasets
import pytest

from rollflow.api import Problem, RewardResult
from rollflow.tasks import FileTask, RewardFnError, RewardSpec, check_reward, load_reward_fn


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a module spec puts its working directory on it


def write_reward(directory, name, value):
    (directory / name).write_text(f"def score(problem, response):\n    return {value}\n")


def test_spec_is_pickled_without_its_function_and_reloads_from_the_file(tmp_path, monkeypatch):
    write_reward(tmp_path, "file_reward.py", 0.5)
    monkeypatch.chdir(tmp_path)
    spec = RewardSpec("file_reward.py:score")
    assert spec(Problem("q", "a"), "r") == 0.5
    payload = pickle.dumps(spec)
    write_reward(tmp_path, "file_reward.py", 0.25)  # what the receiver loads is the file, not the sender's function
    monkeypatch.chdir(tmp_path.parent)  # and a relative path is the sender's working directory's
    received = pickle.loads(payload)
    assert received(Problem("q", "a"), "r") == 0.25
    assert received.spec == "file_reward.py:score" and received.cwd == str(tmp_path)


def test_module_spec_is_imported_from_the_working_directory_it_was_made_in(tmp_path, monkeypatch):
    write_reward(tmp_path, "cwd_only_reward.py", 0.75)
    assert str(tmp_path) not in sys.path
    spec = pickle.loads(pickle.dumps(RewardSpec("cwd_only_reward:score", cwd=str(tmp_path))))
    assert spec(Problem("q", "a"), "r") == 0.75
    assert sys.path[0] == str(tmp_path)  # first, as `python -m` puts it: the user's module wins over an installed one


def test_module_spec_not_in_the_working_directory_says_where_it_looked(tmp_path):
    with pytest.raises(RewardFnError, match=rf"cannot import module 'absent_reward_mod' .*working directory '{tmp_path}'"):
        load_reward_fn("absent_reward_mod:score", cwd=str(tmp_path))


def file_task(tmp_path, reward):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    return FileTask(str(data), reward_fn=reward)


def test_check_calls_the_reward_once_on_a_training_problem_and_its_reference(tmp_path):
    (tmp_path / "strict.py").write_text(
        "def score(problem, response):\n"
        "    if response != problem.answer:\n"
        "        raise ValueError(f'{response!r} is not the reference')\n"
        "    return 0.0\n"
    )
    task = file_task(tmp_path, f"{tmp_path / 'strict.py'}:score")
    check_reward(task, seed=0)  # a reward of 0 for the reference is allowed: only the call is checked
    with pytest.raises(RewardFnError, match=r"on sample 1: 'probe' is not the reference"):  # the check was sample 0
        task.verify(Problem("q", "a"), "probe")


@pytest.mark.parametrize("body, expected", [
    ("raise ValueError('no score')", r"raised ValueError on sample 0: no score \(checked before training: the first "
                                     r"training problem, its reference answer as the response\)"),
    ("return None", r"returned NoneType on sample 0; expected a float, int, bool or RewardResult \(checked before"),
    ("return float('inf')", r"returned a reward of inf on sample 0; rewards must be finite numbers \(checked before"),
])
def test_check_names_the_reward_and_what_went_wrong(tmp_path, body, expected):
    (tmp_path / "bad.py").write_text(f"def score(problem, response):\n    {body}\n")
    task = file_task(tmp_path, f"{tmp_path / 'bad.py'}:score")
    with pytest.raises(RewardFnError, match=rf"^reward fn '.*bad\.py:score' {expected}"):
        check_reward(task, seed=0)


def test_check_passes_a_working_reward_result(tmp_path):
    (tmp_path / "ok.py").write_text(
        "from rollflow import RewardResult\n\n"
        "def score(problem, response):\n    return RewardResult(1.0, {'exact': 1.0})\n"
    )
    task = file_task(tmp_path, f"{tmp_path / 'ok.py'}:score")
    check_reward(task, seed=0)
    assert task.verify(Problem("q", "a"), "r") == RewardResult(1.0, {"exact": 1.0})
