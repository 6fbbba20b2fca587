"""GRPO for language models: optional SFT warm start, then group-relative policy optimisation.

The whole run in one function, top to bottom: build task and model → spawn the worker groups on the backend →
evaluate → SFT → the controller's streaming RL loop (admit within the staleness budget → generate → score → train
on complete groups → publish; rollout workers pick new weights up between calls) → save. The same code runs on
both backends: ``ray`` puts every worker in its own actor, ``inline`` keeps them all in this process.
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import transformers

from rollflow.algos import (
    ADVANTAGES, CORRECTIONS, kl_penalty_rewards, overlong_penalty, policy_loss_fn, proximal, sft_loss, signal_share, value_loss_fn,
)
from rollflow.api import COLUMNS, REFERENCE, Problem, RewardFn, RewardResult, SamplingParams, Status, Task
from rollflow.config import Config, dump_config
from rollflow.config.schema import RuntimeConfig
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, char_tokenizer, load_pretrained, save_pretrained, tiny_model
from rollflow.engines.critic import TorchCriticEngine, ValueModel
from rollflow.engines.torch_train import TorchScorer, TorchTrainEngine
from rollflow.runtime.backend import Backend, InlineBackend, Payloads, Resources
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import Algorithm, ReferenceWorker, RewardWorker, RolloutWorker, TrainerWorker
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.trace import Tracer
from rollflow.runtime.tracking import Tracker
from rollflow.tasks import build_task
from rollflow.tasks.latency import with_reward_latency
from rollflow.tasks.reward_fn import call_reward_fn, check_reward


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


class Tokens:
    """Text ↔ token ids the way every stage of a run needs them: prompts start with BOS, targets end with EOS."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def prompt(self, text: str) -> list[int]:
        return self.bos + self.tokenizer(text, add_special_tokens=False).input_ids

    def target(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]


def with_reward_fn(task: Task, fn: RewardFn) -> Task:
    """The same task, scored by a user's reward function instead of its own verifier."""
    name = getattr(fn, "__qualname__", repr(fn))
    counter = iter(range(1 << 62))
    scored = copy.copy(task)
    scored.verify = lambda problem, response: call_reward_fn(fn, name, problem, response, next(counter))  # type: ignore[method-assign]
    return scored


def evaluate(rollout: WorkerGroup, task: Task, tokens: Tokens, max_new_tokens: int) -> float:
    """Greedy accuracy on the held-out set (newest published weights): the share of problems whose response earns
    the full reward (≥ 1)."""
    problems = task.eval_problems()
    params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    gens = rollout.generate([(i, tokens.prompt(p.prompt)) for i, p in enumerate(problems)], params)
    return sum(task.verify(problems[g.uid], g.cell.response_text).reward >= 1.0 for g in gens) / len(problems)


def build_model(config: Config, task: Task) -> tuple[Any, Any]:
    if config.model.path:
        return load_pretrained(config.model.path)
    m = config.model
    tokenizer = char_tokenizer(task.alphabet())
    spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
    return tiny_model(spec, tokenizer, config.seed), tokenizer


def make_backend(runtime: RuntimeConfig) -> Backend:
    if runtime.backend == "inline":
        return InlineBackend()
    from rollflow.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    return RayBackend(runtime.address, runtime.num_cpus)


# Worker factories: run where the worker lives (an actor's process on Ray), so each engine is built there.
def _rollout_worker(model: Any, tokenizer: Any, config: Config, index: int, transport: Any, payloads: Payloads) -> RolloutWorker:
    r = config.rollout
    engine = HFInferenceEngine(model, tokenizer, config.runtime.max_generate_batch, config.seed + index)
    return RolloutWorker(engine, transport, SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens), payloads)


def _reward_worker(task: Task, concurrency: int) -> RewardWorker:
    return RewardWorker(task.verify, concurrency)


def has_signal(results: list[RewardResult]) -> bool:
    """Dynamic sampling's filter: keep a group only if its usable rewards are not all equal (else every advantage is 0)."""
    rewards = {r.reward for r in results if r.status is not Status.INFRA_ERROR}
    return len(rewards) > 1


def build_algorithm(config: Config) -> Algorithm:
    """The trainer's algorithm from ``config.algo``: every part looked up by name in the registries."""
    a = config.algo
    estimator = ADVANTAGES.get(a.advantage)
    token_level, needs_critic = getattr(estimator, "token_level", False), getattr(estimator, "needs_critic", False)
    advantage = functools.partial(estimator, **_accepted(estimator, scale_by_std=a.scale_by_std, gamma=a.gamma, lam=a.lam))
    loss = policy_loss_fn(
        a.loss, a.aggregation, a.entropy_coef, correction=a.correction,
        correction_params=_accepted(CORRECTIONS.get(a.correction), cap=a.correction_cap, rho=a.correction_cap),
        kl_coef=a.kl_coef if a.kl_in == "loss" else 0.0, kl_estimator=a.kl_estimator,
        norm=a.loss_norm or config.rollout.max_new_tokens,
        clip_low=a.clip_low, clip_high=a.clip_high,
    )
    return Algorithm(
        advantage, loss, token_level=token_level, needs_critic=needs_critic, proximal=proximal(a.correction),
        shape=functools.partial(_overlong, config.rollout.max_new_tokens, a.overlong_buffer) if a.overlong_buffer else None,
        kl_reward=functools.partial(kl_penalty_rewards, coef=a.kl_coef, estimator=a.kl_estimator)
        if a.kl_coef > 0 and a.kl_in == "reward" else None,
        value_loss=value_loss_fn(clip=a.critic.value_clip) if needs_critic else None,
        lr_scale=signal_share if a.lr_by_signal else None,
    )


def _accepted(fn: Callable[..., Any], **params: Any) -> dict[str, Any]:
    """The ``params`` that ``fn`` takes, leaving out unset ones: each registered part gets the config fields it uses."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in params.items() if k in names and v is not None}


def _overlong(max_len: int, buffer: int, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return rewards + overlong_penalty(lengths, max_len, buffer)


def _trainer_worker(model: Any, pad_id: int, config: Config, transport: Any, payloads: Payloads) -> TrainerWorker:
    t = config.train
    algorithm = build_algorithm(config)
    engine = TorchTrainEngine(model, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                              temperature=config.rollout.temperature, seed=config.seed)
    critic = None
    if algorithm.needs_critic:  # the critic starts from the policy's weights (after SFT, when the recipe asks)
        critic = TorchCriticEngine(ValueModel(copy.deepcopy(model)), lr=config.algo.critic.lr, grad_clip=t.grad_clip, seed=config.seed)
    return TrainerWorker(engine, transport, pad_id, algorithm, minibatches=t.minibatches_per_step, epochs=t.epochs_per_step,
                         payloads=payloads, critic=critic, whole_groups=t.whole_groups)


def _reference_worker(model: Any, pad_id: int, config: Config, transport: Any, payloads: Payloads) -> ReferenceWorker:
    return ReferenceWorker(TorchScorer(model, config.rollout.temperature), transport, pad_id, payloads)


def _save(tokenizer: Any, path: Path, model: Any) -> None:
    """Write a Hugging Face checkpoint to ``path`` atomically: a reader sees the old folder or the new one, whole."""
    transformers.utils.logging.disable_progress_bar()  # may run in a worker process
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tokenizer, tmp)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class BestModel:
    """The best held-out evaluation so far; strictly better replaces it, so a tie keeps the earlier. With a ``path``
    (``eval.keep_best``) its weights are saved there, from the rollout worker that was evaluated (worker 0), so what
    is kept is exactly what was scored. The best accuracy is chosen on the held-out set, so it is optimistic as an
    estimate of unseen data; report it beside the final accuracy, not instead of it."""

    path: Path | None
    tokenizer: Any
    accuracy: float = float("-inf")
    step: int | None = None

    def offer(self, step: int, accuracy: float, rollout: WorkerGroup) -> None:
        if accuracy > self.accuracy:
            if self.path is not None:
                rollout.save(functools.partial(_save, self.tokenizer, self.path))
            self.accuracy, self.step = accuracy, step


@dataclass
class Workers:
    rollout: WorkerGroup
    reward: WorkerGroup
    trainer: WorkerGroup
    reference: WorkerGroup | None  # only when the algorithm has a KL term


def spawn_workers(backend: Backend, config: Config, task: Task, model: Any, tokenizer: Any) -> Workers:
    """The worker groups of a run, placed as ``runtime`` says. Rollout and reference engines hold their own copy of
    the weights and only ever change them by version."""
    rt = config.runtime
    transport, payloads = backend.weight_transport(), backend.payloads
    pool = None
    if rt.placement == "colocated":
        pool = "actor"
        backend.make_pool(pool, max(rt.rollout.num_cpus, rt.trainer.num_cpus), rt.rollout.workers + 1)
    rollout = WorkerGroup.spawn(backend, "rollout", RolloutWorker, [
        functools.partial(_rollout_worker, copy.deepcopy(model), tokenizer, config, i, transport, payloads)
        for i in range(rt.rollout.workers)
    ], Resources(rt.rollout.num_cpus, rt.rollout.torch_threads, pool=pool))
    reward = WorkerGroup.spawn(backend, "reward", RewardWorker, [
        functools.partial(_reward_worker, task, rt.reward.concurrency) for _ in range(rt.reward.workers)
    ], Resources(rt.reward.num_cpus, rt.reward.torch_threads, concurrency=rt.reward.concurrency, restartable=True))
    trainer = WorkerGroup.spawn(backend, "trainer", TrainerWorker, [
        functools.partial(_trainer_worker, model, tokenizer.pad_token_id, config, transport, payloads)
    ], Resources(rt.trainer.num_cpus, rt.trainer.torch_threads, pool=pool))
    reference = None
    if config.algo.kl_coef > 0:
        reference = WorkerGroup.spawn(backend, "reference", ReferenceWorker, [
            functools.partial(_reference_worker, copy.deepcopy(model), tokenizer.pad_token_id, config, transport, payloads)
            for _ in range(rt.reference.workers)
        ], Resources(rt.reference.num_cpus, rt.reference.torch_threads))
    # One wait for all groups, so that their workers are built at the same time; a factory that failed stops the run
    # here with its own error rather than at the first call.
    backend.wait_started([w for g in (rollout, reward, trainer, reference) if g is not None for w in g.workers])
    return Workers(rollout, reward, trainer, reference)


def run_sft(trainer: WorkerGroup, task: Task, tokens: Tokens, config: Config, tracker: Tracker) -> None:
    """Supervised warm start on reference solutions, lr decayed linearly to zero."""
    stream = task.train_problems(config.seed + 1)
    for step in range(config.sft.steps):
        trainer.set_lr(config.sft.lr * (1 - step / config.sft.steps))
        problems: list[Problem] = [next(stream) for _ in range(config.sft.batch_size)]
        m = trainer.sft([tokens.prompt(p.prompt) for p in problems], [tokens.target(task.reference(p)) for p in problems], sft_loss)
        if (step + 1) % 50 == 0 or step == config.sft.steps - 1:  # SFT steps are logged as -sft.steps+1 … 0
            tracker.log_step(step + 1 - config.sft.steps, {"sft/loss": m["loss"]}, advance=(step % 50) + 1)


def train(config: Config, task: Task | None = None, reward_fn: RewardFn | None = None) -> RunResult:
    """Run the GRPO recipe described by ``config``. ``task`` replaces the configured task; ``reward_fn`` its verifier."""
    t_start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # our own bar is the run's progress
    torch.set_num_threads(config.runtime.torch_threads)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))

    task = task or build_task(config.task, config.seed)
    if reward_fn is not None:
        task = with_reward_fn(task, reward_fn)
    check_reward(task, config.seed)  # before any expensive work
    lat = config.reward_latency
    train_task = with_reward_latency(task, lat.median, lat.sigma, lat.max, config.seed) if lat.median > 0 else task
    model, tokenizer = build_model(config, task)
    tokens = Tokens(tokenizer)
    r, t, rt = config.rollout, config.train, config.runtime
    rl_threads = rt.torch_threads if rt.backend == "inline" else rt.trainer.torch_threads
    tracer = Tracer(enabled=rt.trace)

    backend = make_backend(rt)
    try:
        workers = spawn_workers(backend, config, train_task, model, tokenizer)
        rollout, reward, trainer = workers.rollout, workers.reward, workers.trainer

        def publish_and_eval() -> float:
            trainer.publish()
            return evaluate(rollout, task, tokens, config.eval.max_new_tokens)

        history: list[dict[str, Any]] = []
        with Tracker(run_dir, total_steps=config.sft.steps + t.steps, show_progress=config.progress) as tracker:
            best = BestModel(run_dir / "model" if config.eval.keep_best else None, tokenizer)
            acc_initial = publish_and_eval()
            tracker.log_eval(0, acc_initial, "initial")
            best.offer(-config.sft.steps, acc_initial, rollout)
            acc_sft, sft_seconds = acc_initial, 0.0
            if config.sft.steps:
                trainer.set_threads(config.sft.torch_threads)
                sft_start = time.perf_counter()
                run_sft(trainer, task, tokens, config, tracker)
                sft_seconds = time.perf_counter() - sft_start
                acc_sft = publish_and_eval()
                tracker.log_eval(0, acc_sft, "after SFT")
                best.offer(0, acc_sft, rollout)
            trainer.set_threads(rl_threads)
            trainer.set_lr(t.lr)
            trainer.init_critic()
            if workers.reference is not None:
                workers.reference.freeze()  # the reference is the policy RL starts from (published just above)

            store = SampleStore(COLUMNS + ((REFERENCE,) if workers.reference is not None else ()))
            budget = StalenessBudget(rt.staleness, config.samples_per_step)
            controller = Controller(
                store, budget, rollout, reward, trainer, task.train_problems(config.seed), tokens.prompt,
                group_size=r.samples_per_prompt, groups_per_step=r.prompts_per_step, generate_batch=rt.generate_batch,
                reward_groups=rt.reward.groups_per_call,
                version=trainer.version(), max_retries=rt.max_retries, tracer=tracer, reference=workers.reference,
                keep_group=has_signal if config.algo.dynamic_sampling else None,
                max_dropped=config.algo.max_dropped_per_step,
            )
            acc, rl_start, last = acc_sft, time.perf_counter(), time.perf_counter()
            for result in controller.run(t.steps):
                step, rows = result.step, [row for g in result.groups for row in g]
                now = time.perf_counter()
                elapsed, last = now - last, now
                rewards = torch.tensor([row.reward.result.reward for row in rows])
                n_tokens = sum(row.generation.num_tokens for row in rows)
                metrics = dict(result.train.metrics)
                record: dict[str, Any] = {
                    "reward/mean": rewards.mean().item(),
                    "reward/std": rewards.std().item(),
                    **{f"reward/{k}": sum(row.reward.result.breakdown.get(k, 0.0) for row in rows) / len(rows)
                       for k in rows[0].reward.result.breakdown},
                    "train/loss": metrics.pop("loss"),
                    **{f"train/{k}": v for k, v in metrics.items() if "/" not in k},
                    **{k: v for k, v in metrics.items() if "/" in k},
                    **result.metrics,
                    "response/length": n_tokens / len(rows),
                    "throughput/samples_per_s": len(rows) / elapsed,
                    "throughput/tokens_per_s": n_tokens / elapsed,
                    "time/train": result.train.finished - result.train.started,
                    "time/step": elapsed,
                    "version": result.train.version,
                }
                if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
                    acc = evaluate(rollout, task, tokens, config.eval.max_new_tokens)
                    record["eval/accuracy"] = acc
                    best.offer(step, acc, rollout)
                tracker.log_step(step, record)
                tracker.log_rollouts([{
                    "uid": row.uid, "step": step, "group": row.group_id, "version": row.generation.version,
                    "prompt": row.prompt.problem.prompt, "response": row.generation.response_text,
                    "reward": row.reward.result.reward, "breakdown": row.reward.result.breakdown, "status": row.status.value,
                } for row in rows])
                history.append({"step": step, **record})
            rl_seconds = time.perf_counter() - rl_start

            if not config.eval.keep_best:
                trainer.save(functools.partial(_save, tokenizer, run_dir / "model"))
            pipeline = controller.pipeline_summary() if t.steps else {}
            summary = {
                "accuracy_initial": acc_initial,
                "accuracy_after_sft": acc_sft,
                "accuracy_final": acc,
                "accuracy_best": best.accuracy,
                "best_step": best.step if config.eval.keep_best else None,  # ≤ 0: before RL (0 = after SFT)
                "saved_model": "best" if config.eval.keep_best else "final",
                "steps": t.steps,
                "samples": t.steps * config.samples_per_step,
                "backend": rt.backend,
                "staleness": rt.staleness,
                "wall_seconds": time.perf_counter() - t_start,
                "sft_seconds": sft_seconds,  # the SFT steps alone, without evaluations
                "rl_seconds": rl_seconds,  # includes evaluations; pipeline_seconds does not count the last one
                "samples_per_second": t.steps * config.samples_per_step / pipeline["pipeline_seconds"] if t.steps else 0.0,
                "infra_retries": controller.infra_retries,
                "dropped_groups": controller.dropped_groups,
                **pipeline,
            }
            if rt.trace:
                tracer.write(run_dir / "trace.json")
            tracker.finish(summary)
    finally:
        backend.shutdown()
    return RunResult(run_dir, summary, history)
