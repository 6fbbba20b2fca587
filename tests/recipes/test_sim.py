"""The simulator recipe as a user runs it: `rollflow train configs/sim/<env>.yaml`, on the inline backend in-process
and on Ray (the default) from the command line, with a user's own environment file, a faulty environment, a killed
actor worker, a resumed run, and the learning each built-in config promises."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_ray_faults import descends_from
from test_resume import start, wait_for_step

from rollflow.config import Config, load_config
from rollflow.recipes import train
from rollflow.runtime.ledger import check
from rollflow.runtime.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CARTPOLE, DOORKEY = str(ROOT / "configs/sim/cartpole.yaml"), str(ROOT / "configs/sim/doorkey.yaml")


def inline(tmp_path, *overrides):
    return load_config(CARTPOLE, ["runtime.backend=inline", f"run_dir={tmp_path / 'run'}", "progress=false",
                                  *overrides])


def test_cartpole_learns_inline_and_leaves_a_whole_run_directory(tmp_path):
    result = train(inline(tmp_path, "train.steps=40", "eval.every=20", "checkpoint.every=20"))
    s, run = result.summary, result.run_dir
    # a random policy's greedy episodes last about 9 steps; 40k env steps of PPO take it far past that
    assert s["eval_return_initial"] < 30 and s["eval_return_final"] > 4 * s["eval_return_initial"], s
    assert s["env_steps"] == 40 * 8 * 128 and s["env_steps_per_second"] > 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(r["throughput/env_steps_per_s"] > 0 and r["staleness/max"] == 0 for r in rows)
    late = [r["episode/return_recent"] for r in rows[-5:]]
    assert min(late) > 3 * rows[0]["episode/return_recent"], late
    assert [r["step"] for r in rows if "eval/return_mean" in r] == [20, 40]
    for name in ("config.yaml", "summary.json", "curves.png", "trace.json", "ledger.jsonl", "model/policy.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000020", "step_000040"]
    assert check(run / "ledger.jsonl").clean


def test_a_resumed_run_continues_to_its_step_count(tmp_path):
    train(inline(tmp_path, "train.steps=6", "checkpoint.every=3", "eval.every=0"))
    config = inline(tmp_path, "train.steps=10", "checkpoint.every=3", "eval.every=0")
    result = train(config, resume=True)
    assert result.summary["resumed_from_step"] == 6
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["version"] for r in rows] == list(range(1, 11))  # the trainer's version went on from the checkpoint
    assert rows[-1]["env/steps"] == 10 * 8 * 128
    assert check(result.run_dir / "ledger.jsonl").clean


def test_a_bad_environment_is_refused_before_the_run_starts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CARTPOLE, "sim.env=NoSuchEnv-v0",
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "sim.env='NoSuchEnv-v0'" in out.stderr and "registered Gymnasium id" in out.stderr
    assert not (tmp_path / "run").exists()
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CARTPOLE, "sim.env=Pendulum-v1",
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Box action space" in out.stderr and "Discrete" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CARTPOLE, "sim.policy=cnn",
                          f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "sim.policy=cnn needs image observations" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


# A user's environment file, given by a path relative to the working directory: CartPole whose step raises once in
# each actor process (a flag file per process), so the actor's environment is dropped, its fragment retried.
FLAKY_ENV = """
import os
import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv

class FlakyCartPole(CartPoleEnv):
    steps = 0

    def step(self, action):
        FlakyCartPole.steps += 1
        flag = os.path.join(os.environ["FLAKY_DIR"], f"crashed.{os.getpid()}")
        if FlakyCartPole.steps == 300 and not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("physics engine diverged")
        return super().step(action)
"""


# A user's own actor-critic: a linear policy and value over CartPole's 4 numbers, counting the forward passes it
# makes in each process (a file per process), so the test sees it ran in the actors.
USER_POLICY = """
import os
import torch

class LinearPolicy(torch.nn.Module):
    def __init__(self, obs_shape, actions, seed=0, scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.pi, self.v, self.scale = torch.nn.Linear(obs_shape[0], actions), torch.nn.Linear(obs_shape[0], 1), scale

    def forward(self, obs):
        open(os.path.join(os.environ["FLAKY_DIR"], f"policy.{os.getpid()}"), "a").write("x")
        return self.pi(obs.float() * self.scale)

    def value(self, obs):
        return self.v(obs.float() * self.scale).squeeze(-1)
"""


def test_user_environment_and_policy_files_run_on_ray_and_a_crash_costs_only_its_fragment(tmp_path):
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "flaky.py").write_text(textwrap.dedent(FLAKY_ENV))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "linear.py").write_text(textwrap.dedent(USER_POLICY))
    proc = start([CARTPOLE, "sim.env=envs/flaky.py:FlakyCartPole", "sim.policy=models/linear.py:LinearPolicy",
                  "sim.policy_kwargs={scale: 0.5}", "train.steps=6", "eval.every=0", "sim.eval_episodes=4",
                  "run_dir=run", "progress=false", "runtime.num_cpus=2"], cwd=tmp_path, FLAKY_DIR=str(tmp_path))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["infra_retries"] >= 1 and summary["env_steps"] == 6 * 8 * 128, summary
    # the user's policy acted in processes other than the driver (the actors) and is what the run saved
    assert len([p for p in tmp_path.glob("policy.*") if p.name != f"policy.{proc.pid}"]) >= 2
    saved = torch.load(run / "model" / "policy.pt", weights_only=False)
    assert set(saved["state_dict"]) == {"pi.weight", "pi.bias", "v.weight", "v.bias"}
    assert list(tmp_path.glob("crashed.*"))  # it did crash, in an actor's process
    assert "physics engine diverged" in out, out  # the fault was reported
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 7))
    assert check(run / "ledger.jsonl").clean


@pytest.mark.slow
def test_an_actor_killed_mid_run_is_replaced_and_training_goes_on(tmp_path):
    steps = 30
    proc = start([CARTPOLE, f"train.steps={steps}", "eval.every=0", "sim.eval_episodes=4", "run_dir=run",
                  "progress=false", "runtime.num_cpus=2", "runtime.rollout.workers=2"], cwd=tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for_step(proc, metrics, 5, timeout=180)
    found = subprocess.run(["pgrep", "-f", "ray::RolloutWorker"], capture_output=True, text=True).stdout.split()
    assert len(found) >= 2, found
    kill_role_any(proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert re.search(r"fault: actor/\d lost", out), out  # the run's notes, printed above the bar
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["faults"]["worker_lost"] == 1 and summary["infra_retries"] >= 1, summary  # its calls went again
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert check(tmp_path / "run" / "ledger.jsonl").clean


def kill_role_any(proc):
    """SIGKILL one of the run's actor workers (there are two)."""
    found = subprocess.run(["pgrep", "-f", "ray::RolloutWorker"], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in found if descends_from(int(p), proc.pid)]
    assert pids, found
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.1)


@pytest.mark.slow
def test_cartpole_reaches_its_target_on_ray_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CARTPOLE, "run_dir=run", "progress=false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["seconds_to_target"] is not None and s["train_return_recent"] >= 475, s
    # the held-out greedy episodes of the final weights: near the maximum of 500 (on Ray the run is not exactly
    # reproducible; one CI run ended at 463.9 after reaching the target)
    assert s["eval_return_final"] >= 400, s


@pytest.mark.slow
def test_doorkey_learns_and_succeeds_on_held_out_layouts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", DOORKEY, "run_dir=run", "progress=false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    # An untrained policy almost never finds the key, the door and the goal in 250 steps.
    assert s["eval_success_initial"] < 0.2 and s["eval_success_final"] > s["eval_success_initial"] + 0.6, s


def test_policy_workers_serve_the_actors_inline_and_the_policy_learns(tmp_path):
    result = train(inline(tmp_path, "train.steps=40", "eval.every=0", "sim.inference=policy_workers",
                          "runtime.rollout.workers=2", "sim.envs_per_actor=4", "sim.calls_per_step=2"))
    s = result.summary
    assert s["eval_return_final"] > 4 * s["eval_return_initial"], s
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert all(r["staleness/max"] == 0 for r in rows)  # inline: each call's actions come from the current version


def test_policy_workers_on_ray_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CARTPOLE, "sim.inference=policy_workers",
                          "runtime.rollout.workers=2", "sim.envs_per_actor=4", "sim.calls_per_step=2", "train.steps=8",
                          "eval.every=0", "sim.eval_episodes=4", "run_dir=run", "progress=false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) and max(r["staleness/max"] for r in rows) <= 1
    assert rows[-1]["env/steps"] == 8 * 1024
    assert check(tmp_path / "run" / "ledger.jsonl").clean


def test_held_out_evaluation_uses_its_own_env_settings_and_reports_each_kind_of_task(tmp_path):
    config = load_config(DOORKEY, ["runtime.backend=inline", f"run_dir={tmp_path / 'run'}", "progress=false",
                                   "sim.env=rollflow.envs.worlds:CrossViewWorld", "sim.eval_episodes=30",
                                   "sim.eval_env_kwargs={split: unseen, interactions: [toggle]}", "train.steps=2",
                                   "sim.envs_per_actor=2", "sim.fragment_steps=16", "train.minibatches_per_step=2",
                                   "eval.every=0"])
    result = train(config)
    final = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval/success" in r][-1]
    # training draws every interaction; the held-out episodes only what eval_env_kwargs allows
    assert {k for k in final if k.startswith("eval/success/")} == {"eval/success/toggle"}, final
    assert final["eval/success/toggle"] == final["eval/success"] == result.summary["eval_success_final"]


CROSSVIEW = str(ROOT / "configs/sim/crossview.yaml")


def test_behaviour_cloning_of_the_planner_then_rl_with_a_kl_to_it(tmp_path):
    config = load_config(CROSSVIEW, ["runtime.backend=inline", f"run_dir={tmp_path / 'run'}", "progress=false",
                                     "sim.bc_steps=300", "sim.bc_episodes=400", "sim.eval_episodes=60",
                                     "sim.eval_sets={train: {split: train}}", "train.steps=3", "sim.envs_per_actor=4",
                                     "sim.calls_per_step=1", "train.minibatches_per_step=2", "eval.every=0",
                                     "runtime.rollout.workers=1", "sim.kl_decay_steps=2"])
    result = train(config)
    s = result.summary
    # the cloned planner solves far more tasks than the random initial policy, in training worlds and unseen ones
    assert s["eval_train_success_after_bc"] > s["eval_success_initial"] + 0.5, s
    assert s["eval_success_after_bc"] > s["eval_success_initial"] + 0.2, s
    assert s["eval_train_success_final"] == result.history[-1]["eval/train/success"]
    assert {"eval/train/success/pickup", "eval/success/pickup"} <= set(result.history[-1])
    # the cloned policy is kept beside the final one, and rebuilds from its own config
    saved = torch.load(result.run_dir / "model" / "policy_bc.pt", weights_only=False)
    assert Config.model_validate(saved["config"]).sim.policy == "rollflow.envs.world_policy:CrossViewPolicy"
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    bc = [r for r in rows if "bc/nll" in r]
    assert [r["step"] for r in bc] == [-200, -100, 0] and bc[-1]["bc/nll"] < 0.7 * bc[0]["bc/nll"], bc
    rl = [r for r in rows if r["step"] > 0]
    assert [r["kl/coef"] for r in rl] == pytest.approx([0.1, 0.05, 0.0])  # decays to 0 over 2 RL steps
    assert rl[0]["kl/ref"] < 0.05  # RL starts at the cloned policy
    assert [r["version"] for r in rl] == [301, 302, 303]  # 300 BC versions, then RL's
    assert (result.run_dir / "checkpoints" / "step_000000").is_dir()  # "after BC": a resume skips it


def test_behaviour_cloning_settings_are_checked(tmp_path):
    for overrides, message in ((["sim.demonstrator=null"], "sim.bc_steps needs sim.demonstrator"),
                               (["sim.bc_steps=0"], "it needs sim.bc_steps > 0"),
                               (["sim.demonstrator=rollflow.envs.worlds:no_such_planner"], "sim.demonstrator=")):
        out = subprocess.run([sys.executable, "-m", "rollflow.cli", "train", CROSSVIEW, *overrides,
                              "runtime.backend=inline", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                             cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr, (overrides, out.stderr)


def test_sampled_held_out_episodes_are_reproducible_and_differ_from_greedy_ones(tmp_path):
    from rollflow.envs.simulator import env_spec
    from rollflow.recipes.sim import build_policy, evaluate

    def config(greedy):
        return load_config(CROSSVIEW, ["runtime.backend=inline", f"sim.eval_greedy={greedy}", "sim.eval_episodes=40",
                                       "sim.bc_steps=0", "sim.kl_coef=0"])

    spec = env_spec("rollflow.envs.worlds:CrossViewWorld", {"split": "train"})
    weights = type("W", (), {"tensors": build_policy(config(True).sim, spec, 0).state_dict()})
    sampled = evaluate(config(False), spec, weights)
    assert evaluate(config(False), spec, weights) == sampled
    greedy = evaluate(config(True), spec, weights)
    # an untrained greedy policy repeats one action and loops until the time limit; sampling wanders and ends sooner
    assert sampled["eval/length_mean"] < greedy["eval/length_mean"], (sampled, greedy)


@pytest.mark.slow
def test_crossview_rl_lifts_the_cloned_policy_in_unseen_worlds_on_ray(tmp_path):
    # the built-in config as a user runs it, shortened to 100 RL steps (of its 200; the learning rate anneals over them)
    proc = start([CROSSVIEW, "train.steps=100", "eval.every=0", "sim.eval_sets={}", "run_dir=run", "progress=false",
                  "runtime.num_cpus=2"], cwd=tmp_path)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    # sampled actions: the untrained policy stumbles on 0.27 of unseen tasks; cloned from 50 planner episodes, 0.41
    # (both fixed by the seed); RL on training worlds adds 20+ points (0.85-0.90 at step 100 in the benchmark)
    assert s["eval_success_after_bc"] > s["eval_success_initial"] + 0.1, s
    assert s["eval_success_final"] > s["eval_success_after_bc"] + 0.2, s
    assert "eval_train_success_final" not in s  # sim.eval_sets={} emptied the config's sets
    final = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert all(final[f"eval/success/{kind}"] > 0.2 for kind in ("approach", "pickup", "toggle")), final
    assert (tmp_path / "run" / "model" / "policy_bc.pt").is_file() and s["backend"] == "ray"


def test_a_resumed_crossview_run_keeps_its_cloned_reference_and_does_not_clone_again(tmp_path):
    def config(steps):
        return load_config(CROSSVIEW, ["runtime.backend=inline", f"run_dir={tmp_path / 'run'}", "progress=false",
                                       "sim.bc_steps=100", "sim.bc_episodes=30", "sim.eval_episodes=10",
                                       f"train.steps={steps}", "sim.envs_per_actor=4", "sim.calls_per_step=1",
                                       "train.minibatches_per_step=2", "eval.every=0", "checkpoint.every=2",
                                       "runtime.rollout.workers=1", "sim.kl_decay_steps=0", "sim.eval_sets={}"])

    first = train(config(4))
    bc_model = (first.run_dir / "model" / "policy_bc.pt").read_bytes()
    result = train(config(6), resume=True)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3, 4, 5, 6]
    assert [r["version"] for r in rows if r["step"] > 0] == list(range(101, 107))
    assert len([r for r in rows if "bc/nll" in r]) == 1  # BC logged once (at its 100th update), not again
    assert (result.run_dir / "model" / "policy_bc.pt").read_bytes() == bc_model
    # the KL term after the resume is to the same cloned policy: the final checkpoint's reference is it, exactly
    state = torch.load(result.run_dir / "checkpoints" / "step_000006" / "trainer.pt", weights_only=False)
    cloned = torch.load(result.run_dir / "model" / "policy_bc.pt", weights_only=False)["state_dict"]
    reference = state["engine"]["reference"]
    assert reference.keys() == cloned.keys()
    assert all(torch.equal(reference[k], cloned[k]) for k in cloned)
    assert all(r["kl/ref"] > 0 for r in rows if r["step"] > 4)
