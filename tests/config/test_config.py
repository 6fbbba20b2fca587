import re

import pytest
import yaml

from rollflow.cli import main
from rollflow.config import Config, ConfigError, dump_config, load_config
from rollflow.config.schema import AdditionTaskConfig, FileTaskConfig, SortingTaskConfig


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == Config()
    assert isinstance(config.task, AdditionTaskConfig)
    assert config.runtime.staleness == 1 and config.runtime.backend == "ray" and config.samples_per_step == 32 * 8


def test_yaml_file_then_overrides_override_wins(tmp_path):
    path = write(tmp_path, "seed: 7\ntrain:\n  steps: 10\n  lr: 0.01\nrollout:\n  prompts_per_step: 4\n")
    config = load_config(path, ["train.steps=3", "rollout.top_p=0.9"])
    assert config.train.steps == 3  # override beats the file
    assert config.train.lr == 0.01  # file value kept where no override
    assert config.seed == 7
    assert config.rollout.prompts_per_step == 4 and config.rollout.top_p == 0.9
    assert config.train.minibatches_per_step == 2  # default kept where neither sets it


def test_task_section_from_file_and_override(tmp_path):
    path = write(tmp_path, "task:\n  name: sorting\n  max_len: 4\n")
    config = load_config(path, ["task.min_len=2"])
    assert isinstance(config.task, SortingTaskConfig)
    assert (config.task.min_len, config.task.max_len) == (2, 4)
    # a task section without a name configures the default task
    assert isinstance(load_config(overrides=["task.max_digits=5"]).task, AdditionTaskConfig)


def test_samples_per_step_is_prompts_times_samples():
    config = load_config(overrides=["rollout.prompts_per_step=5", "rollout.samples_per_prompt=3"])
    assert config.samples_per_step == 15


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (["tain.lr=1"], "unknown key 'tain'; did you mean 'train'?"),
        (
            ["train.steps=abc"],
            "train.steps: Input should be a valid integer, unable to parse string as an integer (got 'abc')",
        ),
        (["train.steps=-1"], "train.steps: Input should be greater than or equal to 0 (got -1)"),
        (["rollout.top_p=1.5"], "rollout.top_p: Input should be less than or equal to 1 (got 1.5)"),
        (
            ["algo.loss=ppo_clp"],
            "algo.loss: unknown name 'ppo_clp' among policy losses; registered: gspo, ppo_clip, reinforce. Did you mean 'ppo_clip'?",
        ),
        (
            ["task.name=foo"],
            "task.name: Input tag 'foo' found using 'name' does not match any of the expected tags: "
            "'addition', 'sorting', 'file'",
        ),
        (
            ["task.name=sorting", "task.max_digits=4"],
            "unknown key 'task.max_digits'; valid keys here: name, min_len, max_len, partial_credit, eval_size",
        ),
        (["task.name=file"], "task.path: required but not set"),
        (["task.min_digits=4", "task.max_digits=2"], "task.min_digits=4 is more than task.max_digits=2"),
        (["task.name=sorting", "task.min_len=5", "task.max_len=2"], "task.min_len=5 is more than task.max_len=2"),
        (["model.hidden_size=30", "model.heads=4"], "model.hidden_size=30 must be divisible by model.heads=4"),
        (
            ["rollout.prompts_per_step=1", "rollout.samples_per_prompt=2", "train.minibatches_per_step=3"],
            "train.minibatches_per_step=3 exceeds samples per step "
            "(2 = rollout.prompts_per_step × rollout.samples_per_prompt)",
        ),
    ],
)
def test_each_invalid_value_is_named_with_its_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(overrides=overrides)
    assert str(info.value) == f"invalid config:\n  - {message}"  # exactly one problem, nothing else


@pytest.mark.parametrize("item", ["trainsteps", "=3"])
def test_malformed_override(item):
    expected = f"override '{item}' is not of the form key.sub=value (e.g. train.lr=1e-4)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(overrides=[item])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_file(tmp_path):
    path = write(tmp_path, "train: [steps: 3\n")
    with pytest.raises(ConfigError, match=r"config file '.*run\.yaml' is not valid YAML: "):
        load_config(path)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- train.steps=3\n- seed=1\n")
    expected = r"config file '.*run\.yaml' must hold a mapping of keys to values, not a list$"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_file_errors_are_reported_like_override_errors(tmp_path):
    path = write(tmp_path, "task:\n  name: file\n  prompt_colum: q\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "unknown key 'task.prompt_colum'; did you mean 'task.prompt_column'?" in str(info.value)
    assert "task.path: required but not set" in str(info.value)


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(
            overrides=["train.lrr=1", "train.steps=abc", "rollout.top_p=1.5", "model.hidden_size=30", "model.heads=4"]
        )
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid config:"
    assert len(lines) == 5
    text = str(info.value)
    for part in ("'train.lr'?", "train.steps:", "rollout.top_p:", "model.hidden_size=30 must be divisible"):
        assert part in text


def test_cross_field_task_errors_are_reported_with_other_errors():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.lrr=1", "task.min_digits=4", "task.max_digits=2"])
    assert "did you mean 'train.lr'?" in str(info.value)
    assert "task.min_digits=4 is more than task.max_digits=2" in str(info.value)


def test_dump_config_round_trips_through_a_file(tmp_path):
    overrides = ["seed=3", "task.name=file", "task.path=data.jsonl", "algo.scale_by_std=false", "train.lr=5e-5"]
    config = load_config(overrides=overrides)
    assert isinstance(config.task, FileTaskConfig)
    path = write(tmp_path, dump_config(config), "dumped.yaml")
    assert load_config(path) == config
    dumped = yaml.safe_load(path.read_text())
    assert dumped["task"]["path"] == "data.jsonl" and dumped["train"]["lr"] == 5e-5
    assert set(dumped) == set(Config.model_fields)  # every section, defaults included


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["steps"] == 3
    assert "  steps: 3\n" in out


def test_cli_config_reads_a_file_then_overrides(tmp_path, capsys):
    path = write(tmp_path, "train:\n  steps: 9\n  lr: 0.5\n")
    assert main(["config", str(path), "train.steps=4"]) == 0
    train = yaml.safe_load(capsys.readouterr().out)["train"]
    assert (train["steps"], train["lr"]) == (4, 0.5)


def test_cli_train_with_bad_config_exits_2_without_training(tmp_path, monkeypatch, capsys):
    import rollflow.recipes

    calls = []
    monkeypatch.setattr(rollflow.recipes, "train", lambda *a, **k: calls.append(a))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "train.lrr=1"]) == 2
    captured = capsys.readouterr()
    assert "rollflow: invalid config:" in captured.err
    assert "did you mean 'train.lr'?" in captured.err
    assert captured.out == ""
    assert calls == []
    assert list(tmp_path.iterdir()) == []  # no run directory was created


def test_cli_list_algos(capsys):
    assert main(["list", "algos"]) == 0
    out = capsys.readouterr().out
    for name in ("grpo", "ppo_clip", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name
    assert re.search(r"^  grpo\s+GRPO: reward minus its group's mean", out, re.M)
