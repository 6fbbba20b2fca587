"""Every algorithm preset in configs/algos runs through the whole recipe on a tiny config (seconds each), and
each leaves the trace of its own parts in the metrics."""

import json
from pathlib import Path

import pytest
from test_grpo import TINY, check_rollouts

import rollflow
from rollflow.recipes import grpo as grpo_recipe
from rollflow.recipes.grpo import build_algorithm

PRESETS = Path(__file__).parents[2] / "configs" / "algos"
# What each preset must show in its last step's metrics (beyond what every run logs).
OWN_METRICS = {
    "grpo": {"train/clip_frac"},
    "dr_grpo": {"train/clip_frac"},
    "rloo": {"train/clip_frac"},
    "reinforce_pp": {"train/clip_frac"},
    "ppo": {"critic/loss", "critic/value_mean", "critic/return_mean"},
    "dapo": {"reward/shaping", "store/dropped"},
    "gspo": {"train/clip_frac", "train/ratio"},
    "grpo_kl": {"train/kl_ref"},
}


def test_every_preset_is_covered():
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(OWN_METRICS)


@pytest.mark.parametrize("preset", sorted(OWN_METRICS))
def test_preset_runs_the_whole_recipe(preset, tmp_path):
    config = rollflow.load_config(PRESETS / f"{preset}.yaml", [*TINY, "train.steps=2", "eval.every=0", f"run_dir={tmp_path}"])
    result = rollflow.train(config)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if m["step"] == 2][-1]
    assert OWN_METRICS[preset] <= set(last), OWN_METRICS[preset] - set(last)
    assert result.summary["steps"] == 2
    assert len(check_rollouts(tmp_path, config)) == 2 * config.samples_per_step  # the stream, the verifier, the means


def test_dynamic_sampling_drops_groups_the_model_cannot_learn_from(tmp_path):
    # The untrained tiny model almost never answers right: nearly every group is all zeros and gets dropped, up to
    # the per-step limit, after which groups are kept so the run goes on.
    config = rollflow.load_config(PRESETS / "dapo.yaml", [*TINY, "train.steps=2", "sft.steps=0", "algo.max_dropped_per_step=3",
                                                          "algo.overlong_buffer=0", f"run_dir={tmp_path}"])
    result = rollflow.train(config)
    assert result.summary["dropped_groups"] == 2 * 3


def test_kl_in_the_reward_runs_with_a_reference_worker(tmp_path):
    config = rollflow.load_config(PRESETS / "ppo.yaml", [*TINY, "train.steps=2", "algo.kl_coef=0.05", "algo.kl_in=reward",
                                                         "algo.kl_estimator=k1", f"run_dir={tmp_path}"])
    result = rollflow.train(config)
    assert "kl/reward_penalty" in result.history[-1]
    # The reference is the policy RL started from: on step 1 the policy has not moved yet, so the KL is exactly 0
    assert result.history[0]["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("preset, keywords", [
    ("grpo", {"scale_by_std": True}), ("dr_grpo", {"scale_by_std": False}), ("rloo", {}),
    ("reinforce_pp", {"gamma": 1.0}), ("ppo", {"gamma": 1.0, "lam": 0.95}),
])
def test_each_estimator_gets_the_config_fields_it_takes(preset, keywords):
    algorithm = build_algorithm(rollflow.load_config(PRESETS / f"{preset}.yaml"))
    assert algorithm.advantage.keywords == keywords


def test_correction_cap_reaches_the_correction_under_its_own_name(monkeypatch):
    # The bound is 'cap' for tis / decoupled and 'rho' for aipo; null keeps each correction's own default.
    seen = {}
    monkeypatch.setattr(grpo_recipe, "policy_loss_fn", lambda *a, correction, correction_params, **kw: seen.update({correction: correction_params}))
    for correction, cap in [("tis", 3.0), ("decoupled", None), ("aipo", 1.5)]:
        build_algorithm(rollflow.load_config(overrides=[f"algo.correction={correction}", f"algo.correction_cap={cap or 'null'}"]))
    assert seen == {"tis": {"cap": 3.0}, "decoupled": {}, "aipo": {"rho": 1.5}}


def test_overlong_buffer_must_fit_in_the_response(tmp_path):
    with pytest.raises(rollflow.ConfigError, match="algo.overlong_buffer=9 exceeds rollout.max_new_tokens=8"):
        rollflow.load_config(overrides=["algo.overlong_buffer=9"])


# Learning regression: a small model warm-started by SFT on the imperfect demonstrator (2-digit addition), then
# 40 RL steps of each algorithm. Inline and one thread, so every run is deterministic. Measured when written:
# SFT 0.69 → grpo 0.855, dr_grpo 0.91, rloo 0.95, reinforce_pp 0.88, ppo 0.935, dapo 0.91, gspo 0.92, grpo_kl 0.915
# (about 4 s of RL each, 30 s of SFT once).
SMALL = [
    "model.hidden_size=64", "model.layers=2", "model.heads=2", "model.intermediate_size=128", "task.max_digits=2",
    "task.eval_size=200", "progress=false", "runtime.backend=inline", "runtime.staleness=0", "runtime.torch_threads=1",
    "sft.torch_threads=1", "eval.every=0",
]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft")
    result = rollflow.train(rollflow.load_config(overrides=[*SMALL, "sft.steps=1500", "sft.batch_size=64", "train.steps=0",
                                                            f"run_dir={run_dir}"]))
    return run_dir / "model", result.summary["accuracy_after_sft"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(OWN_METRICS))
def test_preset_lifts_accuracy_over_the_sft_checkpoint(preset, sft_checkpoint, tmp_path):
    model, acc_sft = sft_checkpoint
    assert 0.5 < acc_sft < 0.8  # room to improve, and the policy samples right answers to learn from
    config = rollflow.load_config(PRESETS / f"{preset}.yaml", [
        *SMALL, f"model.path={model}", "sft.steps=0", "train.steps=40", "rollout.groups_per_step=16", f"run_dir={tmp_path}",
    ])
    result = rollflow.train(config)
    assert result.summary["accuracy_after_sft"] == acc_sft
    assert result.summary["accuracy_final"] >= acc_sft + 0.1, f"{preset}: {acc_sft} → {result.summary['accuracy_final']}"


@pytest.mark.slow
def test_keep_best_saves_the_best_evaluated_model_when_rl_damages_it(sft_checkpoint, tmp_path):
    model, acc_sft = sft_checkpoint
    result = rollflow.train(rollflow.load_config(overrides=[
        *SMALL, f"model.path={model}", "sft.steps=0", "train.steps=4", "train.lr=0.05", "algo.lr_by_signal=false",
        "eval.every=2", "rollout.groups_per_step=8", f"run_dir={tmp_path / 'damaged'}",
    ]))
    s = result.summary
    assert s["accuracy_final"] < acc_sft - 0.2  # a learning rate this large wrecks the policy
    assert (s["accuracy_best"], s["best_step"], s["saved_model"]) == (acc_sft, 0, "best")
    kept = rollflow.train(rollflow.load_config(overrides=[
        *SMALL, f"model.path={tmp_path / 'damaged' / 'model'}", "sft.steps=0", "train.steps=0", f"run_dir={tmp_path / 'kept'}",
    ]))
    assert kept.summary["accuracy_initial"] == acc_sft  # model/ holds the policy RL started from, not the wreck
