"""The recipe on the Ray backend, end to end on CPU: asynchronous (η = 2), the staleness invariant checked from
the recorded versions, the trace, weights through the object store with their checksum verified on receipt."""

import dataclasses
import json
from pathlib import Path

import pytest
import ray
import torch
from test_grpo import check_rollouts

import rollflow
from rollflow.api import VersionedWeights, WeightChecksumError
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.runtime.ledger import check
from rollflow.runtime.ray_backend import RayPayloads, RayWeightTransport

TINY = [  # as in test_grpo.py
    "model.hidden_size=16", "model.layers=1", "model.heads=2", "model.intermediate_size=32",
    "sft.steps=3", "sft.batch_size=8", "rollout.groups_per_step=4", "rollout.group_size=2",
    "task.eval_size=10", "progress=false", "runtime.torch_threads=1", "sft.torch_threads=1",
]
ETA = 2
RAY = [o for o in TINY if not o.startswith(("runtime.backend", "runtime.staleness"))] + [
    "runtime.backend=ray", f"runtime.staleness={ETA}", "train.steps=6", "eval.every=0", "runtime.generate_batch=4",
    "runtime.reward.groups_per_call=1",
]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)  # the backend joins it instead of starting its own
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_run(local_ray, tmp_path_factory):
    return rollflow.train(rollflow.load_config(overrides=[*RAY, f"run_dir={tmp_path_factory.mktemp('ray')}"]))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_trained_token_is_more_than_eta_versions_stale(ray_run):
    metrics = {m["step"]: m for m in lines(ray_run.run_dir / "metrics.jsonl") if m["step"] > 0}
    rollouts = lines(ray_run.run_dir / "rollouts.jsonl")
    assert len(rollouts) == 6 * 4 * 2 and len({r["uid"] for r in rollouts}) == len(rollouts)
    lags = [(metrics[r["step"]]["version"] - 1) - r["version"] for r in rollouts]  # trained at version after − 1
    assert min(lags) >= 0 and max(lags) <= ETA
    assert max(lags) > 0  # the run really was asynchronous
    assert all(m["staleness/max"] <= ETA for m in metrics.values())
    assert all(m["correction/recomputed"] == float(m["staleness/max"] > 0) for m in metrics.values())


def test_ray_run_writes_a_trace_with_a_track_per_worker(ray_run):
    trace = json.loads((ray_run.run_dir / "trace.json").read_text())
    events = trace["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"rollout/0", "reward/0", "trainer"} <= tracks
    spans = {e["name"] for e in events if e["ph"] == "X"}
    assert {"generate", "score", "train step", "publish weights", "load weights"} <= spans
    assert "rollout" not in spans  # a rollout worker's busy time is its engine batches, not its calls' waits
    summary = ray_run.summary
    assert summary["backend"] == "ray" and 0 < summary["trainer_busy_fraction"] <= 1
    assert 0 < summary["pipeline_efficiency"] <= 1 + 1e-9


def test_ray_run_ledger_is_clean(ray_run):
    report = check(ray_run.run_dir / "ledger.jsonl")
    assert report.clean and report.unaccounted == []
    assert report.counts["trained"] == 6 * 4 * 2 == report.counts["admitted"]


TIMED = ("time/", "throughput/", "queue/", "weights/")  # wall-clock measurements, never the same twice


def untimed(run):
    return [{k: v for k, v in m.items() if not k.startswith(TIMED)} for m in lines(run.run_dir / "metrics.jsonl")]


def test_both_backends_run_the_same_recipe(ray_run, tmp_path):
    inline_overrides = [*[o for o in RAY if o != "runtime.backend=ray"], "runtime.backend=inline"]
    inline, again = (rollflow.train(rollflow.load_config(overrides=[*inline_overrides, f"run_dir={tmp_path / d}"]))
                     for d in ("inline", "again"))
    # The inline backend runs one call at a time: a second run samples, scores and trains exactly alike.
    assert lines(inline.run_dir / "rollouts.jsonl") == lines(again.run_dir / "rollouts.jsonl")
    assert untimed(inline) == untimed(again)

    config = rollflow.load_config(overrides=inline_overrides)
    runs = {"ray": ray_run, "inline": inline}
    rows = {name: check_rollouts(run.run_dir, config) for name, run in runs.items()}  # the stream, the verifier
    metrics = {name: [m for m in untimed(run) if m["step"] > 0] for name, run in runs.items()}
    # The same SFT (data, seed, threads) in the trainer actor as in this process.
    sft = {name: [m["sft/loss"] for m in untimed(run) if "sft/loss" in m] for name, run in runs.items()}
    assert sft["ray"] and sft["ray"] == pytest.approx(sft["inline"], rel=1e-5)
    # RL starts from the same published version on both, and each step publishes the next one.
    versions = [m["version"] for m in metrics["inline"]]
    assert [m["version"] for m in metrics["ray"]] == versions == list(range(versions[0], versions[0] + 6))
    for name in runs:
        # the first step trains on samples of the version RL started from, from groups the budget let in before it
        first = [r for r in rows[name] if r["step"] == 1]
        assert {r["version"] for r in first} == {versions[0] - 1}, name
        assert {r["group"] for r in first} <= set(range((ETA + 1) * 4)), name
        lags = [(metrics[name][r["step"] - 1]["version"] - 1) - r["version"] for r in rows[name]]
        assert 0 <= min(lags) and max(lags) <= ETA, name
    assert inline.summary["staleness"] == ray_run.summary["staleness"] == ETA


def test_weights_corrupted_in_transit_are_refused(local_ray, make_model, tokenizer):
    model = make_model(0)
    engine = HFInferenceEngine(make_model(1), tokenizer, 8, 0)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    transport = RayWeightTransport()
    good = VersionedWeights.pack(1, model.state_dict())
    transport.publish(dataclasses.replace(good, checksum="0" * 64))
    fetched = transport.latest(newer_than=0)
    with pytest.raises(WeightChecksumError, match="weights of version 1 arrived corrupted"):
        engine.load_weights(fetched)
    assert all(torch.equal(before[k], v) for k, v in engine.model.state_dict().items())
    assert transport.latest(newer_than=1) is None
    transport.publish(dataclasses.replace(good, version=2))
    engine.load_weights(transport.latest(newer_than=1))
    assert engine.version == 2


def test_payload_handles_resolve_from_the_object_store(local_ray):
    payloads = RayPayloads()
    handles = payloads.put(["a", "b", "c"]) + payloads.put(["d"])
    assert payloads.get([handles[2], handles[0], handles[3], "inline"]) == ["c", "a", "d", "inline"]


def test_kl_and_critic_run_on_ray_with_a_reference_actor(local_ray, tmp_path):
    # PPO (critic in the trainer actor) with KL in the reward, scored by a reference actor beside the reward actor.
    config = rollflow.load_config(Path(__file__).parents[2] / "configs/algos/ppo.yaml", [*RAY, "train.steps=3", "algo.kl_coef=0.05", "algo.kl_in=reward",
                                                             f"run_dir={tmp_path}"])
    result = rollflow.train(config)
    last = result.history[-1]
    assert {"kl/reward_penalty", "critic/loss"} <= set(last)
    assert max(h["time/reference"] for h in result.history) > 0  # reference calls ran (in some step's window)
    tracks = {e["args"]["name"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
              if e.get("name") == "thread_name"}
    assert "reference/0" in tracks


@pytest.mark.slow
def test_auto_staleness_overlaps_slow_rewards_and_says_why(local_ray, tmp_path):
    # Rewards that sleep ~0.3 s each, scored a group per call: a synchronous step waits on them; overlapping hides it.
    overrides = [o for o in RAY if not o.startswith(("runtime.staleness", "train.steps"))] + [
        "runtime.staleness=auto", "runtime.auto_steps=2", "train.steps=5", "reward_latency.median=0.3",
        "reward_latency.sigma=0.1", "reward_latency.max=0.5", f"run_dir={tmp_path}",
    ]
    run = rollflow.train(rollflow.load_config(overrides=overrides))
    summary, metrics = run.summary, [m for m in lines(run.run_dir / "metrics.jsonl") if m["step"] > 0]
    # steps 2 and 3 are measured synchronously (step 1 has no start to measure from); η is settled after step 3
    assert [m["staleness/eta"] for m in metrics[:3]] == [0.0, 0.0, 0.0]
    assert summary["staleness_chosen"] == 2 and metrics[-1]["staleness/eta"] == 2.0
    assert "overlapped at η=2 predicted" in summary["staleness_reason"]
    assert (run.run_dir / "notes.log").read_text().startswith("runtime.staleness=auto: η=2 (synchronous step")
    assert max(m["staleness/max"] for m in metrics) <= 2
