import re
from pathlib import Path

import pytest
import torch
import yaml

from rollflow.algos import ADVANTAGES, AGGREGATIONS, CORRECTIONS, POLICY_LOSSES
from rollflow.api import TrainBatch
from rollflow.cli import main
from rollflow.config import Config, ConfigError, dump_config, load_config
from rollflow.config.schema import AdditionTaskConfig, AlgoConfig, FileTaskConfig, SortingTaskConfig
from rollflow.recipes.grpo import build_algorithm

PRESETS = Path(__file__).parents[2] / "configs" / "algos"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == Config()
    assert isinstance(config.task, AdditionTaskConfig)
    assert config.runtime.staleness == "auto" and config.runtime.backend == "ray" and config.samples_per_step == 32 * 8


def test_yaml_file_then_overrides_override_wins(tmp_path):
    path = write(tmp_path, "seed: 7\ntrain:\n  steps: 10\n  lr: 0.01\nrollout:\n  groups_per_step: 4\n")
    config = load_config(path, ["train.steps=3", "rollout.top_p=0.9"])
    assert config.train.steps == 3  # override beats the file
    assert config.train.lr == 0.01  # file value kept where no override
    assert config.seed == 7
    assert config.rollout.groups_per_step == 4 and config.rollout.top_p == 0.9
    assert config.train.minibatches_per_step == 2  # default kept where neither sets it


def test_an_override_of_a_mapping_sets_it_and_a_dotted_key_changes_one_entry(tmp_path):
    path = write(tmp_path, "sim:\n  env: CartPole-v1\n  env_kwargs: {a: 1, b: 2}\n  eval_sets: {train: {split: train}}\n")
    config = load_config(path, ["sim.eval_sets={}", "sim.env_kwargs={c: 3}", "sim.env_kwargs.d=4"])
    assert config.sim.eval_sets == {}  # emptied, not merged with the file's
    assert config.sim.env_kwargs == {"c": 3, "d": 4}
    assert load_config(path, ["sim.env_kwargs.b=5"]).sim.env_kwargs == {"a": 1, "b": 5}


def test_task_section_from_file_and_override(tmp_path):
    path = write(tmp_path, "task:\n  name: sorting\n  max_len: 4\n")
    config = load_config(path, ["task.min_len=2"])
    assert isinstance(config.task, SortingTaskConfig)
    assert (config.task.min_len, config.task.max_len) == (2, 4)
    # a task section without a name configures the default task
    assert isinstance(load_config(overrides=["task.max_digits=5"]).task, AdditionTaskConfig)


def test_samples_per_step_is_prompts_times_samples():
    config = load_config(overrides=["rollout.groups_per_step=5", "rollout.group_size=3"])
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
            ("task.name: Input tag 'foo' found using 'name' does not match any of the expected tags: "
             "'addition', 'sorting', 'file', 'guess', 'program'"),
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
            ["rollout.groups_per_step=1", "rollout.group_size=2", "train.minibatches_per_step=3"],
            ("train.minibatches_per_step=3 exceeds samples per step "
             "(2 = rollout.groups_per_step × rollout.group_size)"),
        ),
        (
            ["algo.gamma=0.9"],
            ("algo.gamma=0.9 has no effect with algo.advantage=grpo (it is used by: gae, reinforce_pp); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.advantage=reinforce_pp", "algo.lam=0.9"],
            ("algo.lam=0.9 has no effect with algo.advantage=reinforce_pp (it is used by: gae); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.advantage=rloo", "algo.scale_by_std=false"],
            ("algo.scale_by_std=false has no effect with algo.advantage=rloo (it is used by: grpo); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.advantage=reinforce_pp", "algo.critic.value_clip=null"],
            ("algo.critic.value_clip=null has no effect with algo.advantage=reinforce_pp (it is used by: gae); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.correction=none", "algo.correction_cap=3"],
            ("algo.correction_cap=3.0 has no effect with algo.correction=none (it is used by: aipo, decoupled, tis); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.aggregation=seq-mean-token-sum", "algo.loss_norm=16"],
            ("algo.loss_norm=16.0 has no effect with algo.aggregation=seq-mean-token-sum "
             "(it is used by: seq-mean-token-sum-norm); remove it or choose one of those"),
        ),
        (
            ["algo.loss=reinforce", "algo.clip_high=0.28"],
            ("algo.clip_high=0.28 has no effect with algo.loss=reinforce (it is used by: gspo, ppo_clip); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.correction=aipo", "algo.clip_low=0.1"],
            ("algo.clip_low=0.1 has no effect with algo.correction=aipo (it is used by: decoupled, none, tis); "
             "remove it or choose one of those"),
        ),
        (
            ["algo.kl_in=reward"],
            ("algo.kl_in=reward has no effect with algo.kl_coef=0.0 (it is used only with algo.kl_coef > 0); "
             "remove it or set algo.kl_coef > 0"),
        ),
        (
            ["algo.kl_estimator=k1"],
            ("algo.kl_estimator=k1 has no effect with algo.kl_coef=0.0 (it is used only with algo.kl_coef > 0); "
             "remove it or set algo.kl_coef > 0"),
        ),
        (
            ["algo.max_dropped_per_step=3"],
            ("algo.max_dropped_per_step=3 has no effect with algo.dynamic_sampling=false "
             "(it is used only with algo.dynamic_sampling=true); remove it or set algo.dynamic_sampling=true"),
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


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo.advantage=gae", "algo.gamma=0.99", "algo.lam=0.9", "algo.critic.lr=0.001",
         "algo.critic.value_clip=null"],
        ["algo.advantage=reinforce_pp", "algo.gamma=0.99"],
        ["algo.scale_by_std=false"],
        ["algo.correction=aipo", "algo.correction_cap=1.5"],
        ["algo.correction=decoupled", "algo.correction_cap=3"],
        ["algo.aggregation=seq-mean-token-sum-norm", "algo.loss_norm=16"],
        ["algo.loss=gspo", "algo.clip_low=0.0003", "algo.clip_high=0.0004"],
        ["algo.kl_coef=0.01", "algo.kl_estimator=k1", "algo.kl_in=reward"],
        ["algo.dynamic_sampling=true", "algo.max_dropped_per_step=3"],
        # fields at their defaults are accepted whatever the parts: a written config.yaml lists them all
        ["algo.loss=reinforce", "algo.correction=none", "algo.gamma=1.0", "algo.lam=0.95", "algo.clip_high=0.2",
         "algo.correction_cap=null", "algo.kl_in=loss", "algo.critic.lr=0.0001", "algo.max_dropped_per_step=64"],
    ],
)
def test_fields_the_chosen_parts_use_are_accepted(overrides):
    algo = load_config(overrides=overrides).algo
    for item in overrides:
        key, value = item.removeprefix("algo.").split("=")
        section, _, field = key.rpartition(".")
        assert getattr(getattr(algo, section) if section else algo, field) == yaml.safe_load(value), item


def test_every_unused_field_is_reported_in_one_error():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["algo.gamma=0.9", "algo.lam=0.5", "algo.kl_in=reward"])
    text = str(info.value)
    for key in ("algo.gamma=0.9", "algo.lam=0.5", "algo.kl_in=reward"):
        assert f"{key} has no effect" in text


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_preset_loads_again_from_the_config_a_run_writes(preset, tmp_path):
    config = load_config(preset)
    assert load_config(write(tmp_path, dump_config(config), "config.yaml")) == config


def _fingerprint(config: Config) -> list[torch.Tensor]:
    """What the recipe's algorithm computes from fixed inputs: advantages, and the policy loss with its gradient."""
    algo = build_algorithm(config)
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = torch.ones(B, T)
    if algo.token_level:
        advantages = algo.advantage(torch.randn(B, T, generator=g), mask, torch.randn(B, T, generator=g))[0]
    else:
        advantages = algo.advantage(torch.rand(B, T, generator=g))
    logprobs = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    old = logprobs.detach() + 0.5 * torch.randn(B, T, generator=g)
    behav = old + 0.5 * torch.randn(B, T, generator=g)
    batch = TrainBatch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long), mask, old, behav,
                       torch.randn(B, T, generator=g), torch.zeros(B, T, dtype=torch.long))
    loss = algo.loss(logprobs, torch.zeros(B, T), batch).loss
    loss.backward()
    return [advantages, loss.detach(), logprobs.grad]


def _refused_exactly_where_it_changes_nothing(choices: dict[str, str], field: str, moved: object) -> None:
    default = AlgoConfig.model_fields[field].default
    at_default, at_moved = ({**choices, field: value} for value in (default, moved))
    changes = not all(torch.equal(a, b) for a, b in zip(
        _fingerprint(Config.model_construct(algo=AlgoConfig.model_construct(**at_default))),
        _fingerprint(Config.model_construct(algo=AlgoConfig.model_construct(**at_moved))),  # unvalidated
        strict=True,
    ))
    try:
        load_config(overrides=[f"algo.{k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in at_moved.items()])
        accepted = True
    except ConfigError:
        accepted = False
    assert accepted == changes, f"{at_moved}: accepted={accepted}, but changes what the run computes={changes}"


@pytest.mark.parametrize("field, moved", [("scale_by_std", False), ("gamma", 0.5), ("lam", 0.5)])
@pytest.mark.parametrize("advantage", ADVANTAGES.names())
def test_an_estimator_field_is_refused_exactly_where_it_changes_nothing(advantage, field, moved):
    _refused_exactly_where_it_changes_nothing({"advantage": advantage}, field, moved)


@pytest.mark.parametrize("correction", CORRECTIONS.names())
def test_correction_cap_is_refused_exactly_where_it_changes_nothing(correction):
    _refused_exactly_where_it_changes_nothing({"correction": correction}, "correction_cap", 1.1)


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
def test_loss_norm_is_refused_exactly_where_it_changes_nothing(aggregation):
    _refused_exactly_where_it_changes_nothing({"aggregation": aggregation}, "loss_norm", 3.0)


@pytest.mark.parametrize("field", ["clip_low", "clip_high"])
@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
@pytest.mark.parametrize("correction", CORRECTIONS.names())
def test_a_clip_is_refused_exactly_where_it_changes_nothing(loss, correction, field):
    _refused_exactly_where_it_changes_nothing({"loss": loss, "correction": correction}, field, 0.01)


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
        assert re.search(rf"^  {re.escape(name)}\s", out, re.MULTILINE), name
    assert re.search(r"^  grpo\s+GRPO: reward minus its group's mean", out, re.MULTILINE)
