"""GRPO for language models: optional SFT warm start, then group-relative policy optimisation.

The whole run in one function, top to bottom: build task and model → spawn the worker groups on the backend →
evaluate → SFT → the controller's streaming RL loop (admit within the staleness budget → generate → score → train
on complete groups → publish; rollout workers pick new weights up between calls) → save. The same code runs on
both backends: ``ray`` puts every worker in its own actor, ``inline`` keeps them all in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import inspect
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from rollflow.algos import (
    ADVANTAGES,
    CORRECTIONS,
    kl_penalty_rewards,
    overlong_penalty,
    policy_loss_fn,
    proximal,
    sft_loss,
    signal_share,
    value_loss_fn,
)
from rollflow.algos.batch import collate
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import (
    Column,
    Problem,
    Reject,
    RewardFn,
    RewardResult,
    RolloutWorkflow,
    SampleRow,
    SamplingParams,
    Status,
    Task,
    TrainBatch,
    TrajectoryCell,
)
from rollflow.config import Config, ConfigError, dump_config, load_config
from rollflow.config.schema import RuntimeConfig
from rollflow.engines.critic import TorchCriticEngine, ValueModel
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import (
    TinyModelSpec,
    char_tokenizer,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
    tiny_model,
)
from rollflow.engines.torch_train import TorchScorer, TorchTrainEngine
from rollflow.runtime.backend import Backend, InlineBackend, Payloads, Resources, WorkerGone
from rollflow.runtime.checkpoint import Checkpoints, RunDirError, read_meta
from rollflow.runtime.controller import Controller, StepResult, TrainerLost
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.ledger import Ledger
from rollflow.runtime.roles import REFERENCE as REFERENCE_WEIGHTS
from rollflow.runtime.roles import ReferenceWorker, RewardWorker, TrainerWorker
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.stage import Stage
from rollflow.runtime.staleness import StageTimes, StalenessBudget, StalenessTuner
from rollflow.runtime.store import SampleStore
from rollflow.runtime.trace import Tracer
from rollflow.runtime.tracking import Resume, Tracker, read_metrics
from rollflow.tasks import build_task
from rollflow.tasks.latency import with_reward_latency
from rollflow.tasks.reward_fn import call_reward_fn, check_reward
from rollflow.workflows import AgentLoop, SingleTurn, Tokens

# The store's columns: the problem (admission) → its trajectory → its reward and, with a KL term, the reference
# policy's log-probs (side by side).
TASK, TRAJECTORY, REWARD, REFERENCE = "task", "trajectory", "reward", "reference"


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def with_reward_fn(task: Task, fn: RewardFn) -> Task:
    """The same task, scored by a user's reward function instead of its own verifier."""
    name = getattr(fn, "__qualname__", repr(fn))
    counter = iter(range(1 << 62))
    scored = copy.copy(task)
    scored.verify = lambda problem, response: call_reward_fn(fn, name, problem, response, next(counter))  # type: ignore[method-assign]
    return scored


def evaluate(rollout: WorkerGroup, task: Task, tokens: Tokens, max_new_tokens: int, agent: bool = False,
             threads: int = 1) -> float:
    """Greedy accuracy on the held-out set (newest published weights): the share of problems whose response earns
    the full reward (≥ 1). With ``agent`` each problem is a whole greedy episode of the rollout workflow, rewarded
    by its environment (or, if it gives none, by the verifier on its last turn). ``threads`` verifiers run at once."""
    problems = task.eval_problems()
    params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    if agent:
        episodes = rollout.episodes(list(enumerate(problems)), params)
        answers = [(i, cell) for i, cell in episodes if not isinstance(cell, Reject)]
    else:
        answers = rollout.generate([(i, tokens.prompt(p.prompt)) for i, p in enumerate(problems)], params)

    def solved(answer: tuple[int, Any]) -> bool:
        i, out = answer
        given = out.reward if agent else None  # an agent environment's own reward
        return (given or task.verify(problems[i], out.text if agent else out.response_text)).reward >= 1.0

    # Verifiers may take a while (a program run in the sandbox): score the held-out answers concurrently.
    with ThreadPoolExecutor(min(threads, len(answers) or 1), thread_name_prefix="eval") as pool:
        return sum(pool.map(solved, answers)) / len(problems)


def is_agent(config: Config, task: Task) -> bool:
    """Whether the run's rollouts are agent episodes (``AgentLoop``) rather than one response per prompt."""
    kind, has_env = config.rollout.workflow, callable(getattr(task, "make_env", None))
    if kind == "agent" and not has_env:
        raise ConfigError(f"rollout.workflow=agent needs a task with an environment (make_env); task "
                          f"'{task.name}' has none: use rollout.workflow=single_turn or an agent task (guess)")
    return has_env if kind == "auto" else kind == "agent"


def make_workflow(config: Config, task: Task, tokens: Tokens) -> RolloutWorkflow:
    """The rollout workflow ``config.rollout.workflow`` names (``auto``: an agent loop if the task has an environment)."""
    if not is_agent(config, task):
        return SingleTurn(tokens)
    r = config.rollout
    return AgentLoop(task.make_env, tokens, r.max_turns, r.turn_discount,  # type: ignore[attr-defined]
                     max_context=None if config.model.path else config.model.max_positions - r.max_new_tokens)


def build_model(config: Config, alphabet: str) -> tuple[Any, Any]:
    """The model and tokenizer ``config.model`` describes: a local checkpoint, or the built-in tiny model (seeded, so
    every process that builds it gets the same weights) with a tokenizer made from the task's ``alphabet``."""
    if config.model.path:
        return load_pretrained(config.model.path)
    m = config.model
    tokenizer = char_tokenizer(alphabet)
    spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
    return tiny_model(spec, tokenizer, config.seed), tokenizer


def build_tokenizer(config: Config, alphabet: str) -> Any:
    """The tokenizer alone, for the driver (which never holds the weights)."""
    return load_tokenizer(config.model.path) if config.model.path else char_tokenizer(alphabet)


def make_backend(runtime: RuntimeConfig) -> Backend:
    if runtime.backend == "inline":
        return InlineBackend()
    from rollflow.runtime.ray_backend import RayBackend  # Ray is imported only when asked for

    return RayBackend(runtime.address, runtime.num_cpus)


def cores(runtime: RuntimeConfig) -> int:
    return runtime.num_cpus or os.cpu_count() or 1


def role_threads(runtime: RuntimeConfig, eta: int) -> tuple[int, int]:
    """torch threads of (rollout, trainer) at staleness ``eta``, unless configured: every core when the stages take
    turns (η = 0), an even share when they overlap."""
    n = cores(runtime)
    rollout, trainer = (n, n) if eta == 0 else (max(1, n // 2), max(1, n - n // 2))
    return runtime.rollout.torch_threads or rollout, runtime.trainer.torch_threads or trainer


def first_staleness(runtime: RuntimeConfig) -> int:
    """η at the start of RL: as configured, or 0 while ``auto`` measures."""
    return 0 if runtime.staleness == "auto" else runtime.staleness


# Worker factories: run where the worker lives (an actor's process on Ray), so each engine is built there, from the
# config (a spec, not weights): a worker rebuilt after a crash then loads the current weights from the transport.
def _rollout_worker(config: Config, task: Task, index: int, transport: Any, payloads: Payloads, threads: int) -> RolloutWorker:
    r, rt = config.rollout, config.runtime
    model, tokenizer = build_model(config, task.alphabet())
    engine = HFInferenceEngine(model, tokenizer, rt.max_generate_batch, config.seed + index)
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
    limits = Limits(episode=r.episode_timeout, engine=r.engine_timeout, env=r.env_timeout)
    return RolloutWorker(engine, transport, make_workflow(config, task, Tokens(tokenizer)), params, payloads, limits,
                         threads=threads, max_batch=rt.generate_batch, gather=rt.rollout.gather_s,
                         continuous=rt.rollout.continuous_batching if rt.rollout.continuous_batching is not None
                         else rt.backend != "inline")


def score_text(verify: Callable[[Problem, str], RewardResult], problem: Problem, cell: TrajectoryCell) -> RewardResult:
    """The reward of a text trajectory: the environment's, if it gave one, else the verifier's on its text. A timed-out
    episode keeps the verifier's reward of what it wrote, classified ``timeout``; an infrastructure fault is not scored."""
    if cell.status is Status.INFRA_ERROR:
        return RewardResult(0.0, status=Status.INFRA_ERROR)
    result = cell.reward if cell.reward is not None else verify(problem, cell.text)
    return RewardResult(result.reward, result.breakdown, cell.status) if cell.status is not Status.OK else result


def _reward_worker(task: Task, concurrency: int, timeout: float | None) -> RewardWorker:
    return RewardWorker(functools.partial(score_text, task.verify), concurrency, timeout)


def has_signal(rows: list[SampleRow]) -> bool:
    """Dynamic sampling's filter: keep a group only if its usable rewards are not all equal (else every advantage is 0)."""
    rewards = {r[REWARD].result.reward for r in rows if r.status is not Status.INFRA_ERROR}
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
        duration_weighting=a.duration_weighting,
    )


def _accepted(fn: Callable[..., Any], **params: Any) -> dict[str, Any]:
    """The ``params`` that ``fn`` takes, leaving out unset ones: each registered part gets the config fields it uses
    (``AlgoConfig`` has already refused a field set away from its default that the chosen part does not use)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in params.items() if k in names and v is not None}


def _overlong(max_len: int, buffer: int, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return rewards + overlong_penalty(lengths, max_len, buffer)


def _trainer_worker(config: Config, alphabet: str, transport: Any, payloads: Payloads) -> TrainerWorker:
    t = config.train
    model, tokenizer = build_model(config, alphabet)
    algorithm = build_algorithm(config)
    engine = TorchTrainEngine(model, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                              temperature=config.rollout.temperature, seed=config.seed)
    critic = None
    if algorithm.needs_critic:  # the critic starts from the policy's weights (after SFT, when the recipe asks)
        critic = TorchCriticEngine(ValueModel(copy.deepcopy(model)), lr=config.algo.critic.lr, grad_clip=t.grad_clip, seed=config.seed)
    step = TextPolicyStep(algorithm, tokenizer.pad_token_id, t.minibatches_per_step, t.epochs_per_step, t.whole_groups)
    return TrainerWorker(engine, transport, step, payloads, critic)


def _reference_worker(config: Config, alphabet: str, transport: Any, payloads: Payloads) -> ReferenceWorker:
    model, tokenizer = build_model(config, alphabet)
    return ReferenceWorker(TorchScorer(model, config.rollout.temperature), transport, tokenizer.pad_token_id, payloads)


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
    transport: Any  # the backend's weight transport, as the driver holds it


def spawn_workers(backend: Backend, config: Config, task: Task) -> Workers:
    """The worker groups of a run, placed as ``runtime`` says. Each builds its engine from the config; rollout and
    reference engines then change weights only by version, from the transport. Every role but the trainer is
    rebuilt by the backend if its worker dies (Ray); the trainer's state lives only in checkpoints."""
    rt = config.runtime
    transport, payloads = backend.weight_transport(), backend.payloads
    rollout_threads, trainer_threads = role_threads(rt, first_staleness(rt))
    alphabet = task.alphabet()
    pool = None
    if rt.placement == "colocated":
        pool = "actor"
        backend.make_pool(pool, max(rt.rollout.num_cpus, rt.trainer.num_cpus), rt.rollout.workers + 1)
    rollout = WorkerGroup.spawn(backend, "rollout", RolloutWorker, [
        functools.partial(_rollout_worker, config, task, i, transport, payloads, rollout_threads)
        for i in range(rt.rollout.workers)
    ], Resources(rt.rollout.num_cpus, 1, concurrency=rt.rollout.concurrency + 2, pool=pool, restartable=True))  # + eval, weights
    reward = WorkerGroup.spawn(backend, "reward", RewardWorker, [
        functools.partial(_reward_worker, task, rt.reward.concurrency, rt.reward.timeout) for _ in range(rt.reward.workers)
    ], Resources(rt.reward.num_cpus, rt.reward.torch_threads or 1, concurrency=rt.reward.concurrency, restartable=True))
    trainer = WorkerGroup.spawn(backend, "trainer", TrainerWorker, [
        functools.partial(_trainer_worker, config, alphabet, transport, payloads)
    ], Resources(rt.trainer.num_cpus, trainer_threads, pool=pool))
    reference = None
    if config.algo.kl_coef > 0:
        reference = WorkerGroup.spawn(backend, "reference", ReferenceWorker, [
            functools.partial(_reference_worker, config, alphabet, transport, payloads)
            for _ in range(rt.reference.workers)
        ], Resources(rt.reference.num_cpus, rt.reference.torch_threads or 1, restartable=True))
    # One wait for all groups, so that their workers are built at the same time; a factory that failed stops the run
    # here with its own error rather than at the first call.
    backend.wait_started([w for g in (rollout, reward, trainer, reference) if g is not None for w in g.workers])
    return Workers(rollout, reward, trainer, reference, transport)


def build_pipeline(config: Config, workers: Workers, task: Task, version: int, tracer: Tracer,
                   ledger: Ledger | None = None) -> Controller:
    """GRPO's store and stage table: each problem's group is rolled out, then scored and (with a KL term) scored by
    the reference policy side by side; the trainer takes complete groups."""
    r, rt, reference = config.rollout, config.runtime, workers.reference
    columns = [Column(TASK), Column(TRAJECTORY, (TASK,), versioned=True), Column(REWARD, (TRAJECTORY,))]
    stages = [
        Stage(TRAJECTORY, workers.rollout, "rollout", lambda uid, cells: (uid, cells[TASK]),
              groups_per_call=rt.rollout.groups_per_call, calls_per_worker=rt.rollout.concurrency),
        Stage(REWARD, workers.reward, "score", lambda uid, cells: (uid, cells[TASK], cells[TRAJECTORY]),
              groups_per_call=rt.reward.groups_per_call, calls_per_worker=rt.reward.concurrency),
    ]
    if reference is not None:
        columns.append(Column(REFERENCE, (TRAJECTORY,)))
        stages.append(Stage(REFERENCE, reference, "score", lambda uid, cells: (uid, cells[TRAJECTORY]),
                            groups_per_call=rt.reward.groups_per_call, calls_per_worker=2))
    return Controller(
        SampleStore(columns), StalenessBudget(first_staleness(rt), config.samples_per_step), stages, workers.trainer,
        task.train_problems(config.seed), group_size=r.group_size, groups_per_step=r.groups_per_step,
        version=version, max_retries=rt.max_retries, tracer=tracer, call_timeout=rt.call_timeout,
        keep_group=has_signal if config.algo.dynamic_sampling else None, max_dropped=config.algo.max_dropped_per_step,
        ledger=ledger,
    )


class AutoStaleness:
    """``runtime.staleness=auto`` in a run: feeds each step's measured stage times to a ``StalenessTuner`` and makes
    the workers follow the η it picks (threads per ``role_threads``, the controller's bound)."""

    def __init__(self, config: Config, controller: Controller, workers: Workers, tuner: StalenessTuner | None = None) -> None:
        rt = config.runtime
        self.runtime, self.controller, self.workers = rt, controller, workers
        n = cores(rt)
        self.tuner = tuner if tuner is not None else (  # a resumed run keeps the η it settled
            StalenessTuner(rt.auto_steps, split=n / max(1, n // 2)) if rt.staleness == "auto" else None)
        self.last_finished: float | None = None

    @property
    def chosen(self) -> int | None:
        """The η the run settled on (as configured, if not auto; None while auto is still measuring)."""
        if self.tuner is None:
            return int(self.runtime.staleness)
        return self.tuner.eta if self.tuner.settled else None

    @property
    def reason(self) -> str:
        return "configured" if self.tuner is None else self.tuner.reason

    def observe(self, result: StepResult) -> str | None:
        """Record a step; returns the decision's one-line log when η is settled."""
        train, last = result.train, self.last_finished
        self.last_finished = train.finished
        if self.tuner is None or self.tuner.settled:
            return None
        if self.runtime.backend == "inline":
            self.tuner.settled, self.tuner.reason = True, "the inline backend runs one call at a time: stages cannot overlap"
            return f"runtime.staleness=auto: η=0 ({self.tuner.reason})"
        if last is None:
            return None  # the first step has no start to measure from (the one before it ended before RL)
        m = result.metrics
        score = max(m.get(f"time/{REWARD}", 0.0), m.get(f"time/{REFERENCE}", 0.0))  # side by side
        eta = self.tuner.observe(StageTimes(m.get(f"time/{TRAJECTORY}", 0.0), score, train.finished - train.started,
                                            train.finished - last))
        if eta is not None:
            rollout_threads, trainer_threads = role_threads(self.runtime, eta)
            self.workers.rollout.set_threads(rollout_threads)
            self.workers.trainer.set_threads(trainer_threads)
            self.controller.set_staleness(eta)
        return f"runtime.staleness=auto: η={self.tuner.eta} ({self.tuner.reason})" if self.tuner.settled else None


def run_sft(trainer: WorkerGroup, task: Task, tokens: Tokens, config: Config, tracker: Tracker, pad_id: int,
            stop: StopSignals | None = None, first: int = 0,
            checkpoint: Callable[[int, str], Path] | None = None) -> None:
    """Supervised warm start on reference solutions, lr decayed linearly to zero, from SFT step ``first`` (a resumed
    run) to ``sft.steps``. The next batch is tokenised while the trainer trains on this one. ``checkpoint(done,
    why)`` is called every ``checkpoint.sft_every`` steps, and when a stop signal ends SFT after the current step."""
    stream = task.train_problems(config.seed + 1)
    for _ in range(first * config.sft.batch_size):  # the problems the steps before ``first`` trained on
        next(stream)

    demonstration = getattr(task, "demonstration", None)  # an agent task's whole episodes

    def batch() -> Any:
        problems: list[Problem] = [next(stream) for _ in range(config.sft.batch_size)]
        if callable(demonstration):
            return TrainBatch.from_trajectories([tokens.episode(demonstration(p)) for p in problems], pad_id)
        return collate([tokens.prompt(p.prompt) for p in problems], [tokens.target(task.reference(p)) for p in problems], pad_id)

    steps, every, upcoming = config.sft.steps, config.checkpoint.sft_every, batch()
    for step in range(first, steps):
        call = trainer.submit(0, "sft", upcoming, sft_loss, config.sft.lr * (1 - step / steps))
        upcoming = batch() if step + 1 < steps else None
        try:
            m = trainer.backend.result(call)
        except Exception as e:
            if trainer.backend.is_worker_lost(e):  # the run goes back to its last checkpoint (train's restarts)
                raise WorkerGone(f"the trainer was lost during SFT step {step + 1} ({type(e).__name__})") from e
            raise
        if (step + 1) % 50 == 0 or step == steps - 1:  # SFT steps are logged as -sft.steps+1 … 0
            tracker.log_step(step + 1 - steps, {"sft/loss": m["loss"]}, advance=(step + 1) - max(first, step // 50 * 50))
        if stop is not None and stop.requested is not None:
            if checkpoint is None:
                raise Stopped(f"stopped by {stop.requested} during SFT (step {step + 1} of {steps}), no checkpoint")
            path = checkpoint(step + 1, f"stopped by {stop.requested}")
            raise Stopped(f"stopped by {stop.requested} during SFT (step {step + 1} of {steps}); checkpoint {path}; "
                          f"continue with `rollflow train --resume {config.run_dir}`")
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            checkpoint(step + 1, "periodic (SFT)")


def step_record(result: StepResult, elapsed: float) -> dict[str, Any]:
    """The metrics line of one RL step: the samples' rewards and lengths, the trainer's and the pipeline's metrics."""
    rows = [row for g in result.groups for row in g]
    rewards = torch.tensor([row[REWARD].result.reward for row in rows])
    n_tokens = sum(row[TRAJECTORY].size for row in rows)
    metrics = dict(result.train.metrics)
    scored = [row for row in rows if row.status is not Status.INFRA_ERROR] or rows
    breakdown = dict.fromkeys(k for row in scored for k in row[REWARD].result.breakdown)
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        **{f"reward/{k}": sum(row[REWARD].result.breakdown.get(k, 0.0) for row in scored) / len(scored) for k in breakdown},
        "status/not_ok": sum(row.status is not Status.OK for row in rows) / len(rows),
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


class Stopped(RuntimeError):
    """The run was stopped by SIGINT or SIGTERM; a checkpoint was written first (unless it was still in SFT)."""


class NonFiniteLoss(RuntimeError):
    """Several steps in a row had no finite loss; the last good step was checkpointed."""


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop at its next step boundary, with a checkpoint; a second SIGINT stops
    it at once (KeyboardInterrupt). Installed only in the main thread (Python delivers signals there)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._before: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


@dataclass
class Progress:
    """What the recipe itself carries from step to step, saved in every checkpoint."""

    acc_initial: float
    acc_sft: float
    sft_seconds: float
    best: BestModel
    evals: list[tuple[int, float, str]]
    acc: float  # the latest held-out accuracy
    nonfinite_streak: int = 0  # steps in a row without a finite update
    tuner: StalenessTuner | None = None  # runtime.staleness=auto, once settled


def prepare_run_dir(config: Config, resume: bool, overwrite: bool) -> Path | None:
    """Check that the run directory may be used as asked; returns the checkpoint to resume from (``resume``).

    A new run refuses a directory that holds anything unless ``overwrite`` (which empties it). A resumed run needs
    the run's config.yaml, a config that changes only what ``RESUMABLE`` allows, and a whole checkpoint."""
    run_dir = Path(config.run_dir)
    if resume:
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise RunDirError(f"cannot resume {str(run_dir)!r}: it has no config.yaml, so it is not a rollflow run "
                              f"directory (give the run_dir of an earlier `rollflow train`)")
        try:
            saved = load_config(saved_path)
        except ConfigError as e:
            raise RunDirError(f"cannot resume {str(run_dir)!r}: its config.yaml no longer loads: {e}") from e
        if differ := config.resume_differences(saved):
            listed = "; ".join(f"{k}: {was!r} in the run, {now!r} now" for k, (was, now) in differ.items())
            raise RunDirError(f"cannot resume {str(run_dir)!r} with a different config ({listed}); only "
                              f"train.steps, eval.*, checkpoint.*, runtime.* and progress may change on resume")
        checkpoint = Checkpoints(run_dir / "checkpoints").latest()
        if checkpoint is None:
            raise RunDirError(f"cannot resume {str(run_dir)!r}: it has no complete checkpoint (the run stopped before "
                              f"its first, written after the initial evaluation); start it again with --overwrite")
        done = read_meta(checkpoint)["step"]  # type: ignore[index]
        if done >= config.train.steps:
            raise RunDirError(f"{str(run_dir)!r} has already done {done} of train.steps={config.train.steps} steps; "
                              f"resume with a larger train.steps to train on")
        (run_dir / "config.yaml").write_text(dump_config(config))
        return checkpoint
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"run_dir {str(run_dir)!r} already holds a run; continue it with `rollflow train --resume "
                              f"{run_dir}`, start afresh with --overwrite (deletes it), or set another run_dir")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    return None


def train(config: Config, task: Task | None = None, reward_fn: RewardFn | None = None, *, resume: bool = False,
          overwrite: bool = False) -> RunResult:
    """Run the GRPO recipe described by ``config``. ``task`` replaces the configured task; ``reward_fn`` its verifier.

    ``resume`` continues the run in ``config.run_dir`` from its newest checkpoint, to ``train.steps``; ``overwrite``
    lets a new run replace what the directory holds. If the trainer dies, the run goes back to its last checkpoint
    on its own, up to ``runtime.max_restarts`` times."""
    transformers.utils.logging.disable_progress_bar()  # our own bar is the run's progress
    torch.set_num_threads(config.runtime.torch_threads)
    # The user's inputs first, before the run directory is touched or anything expensive is built.
    task = task or build_task(config.task, config.seed)
    if reward_fn is not None:
        task = with_reward_fn(task, reward_fn)
    check_reward(task, config.seed)
    is_agent(config, task)  # a workflow the task cannot run is refused here
    tokenizer = build_tokenizer(config, task.alphabet())
    checkpoint = prepare_run_dir(config, resume, overwrite)
    return with_restarts(config, checkpoint, functools.partial(_run, config, task, tokenizer))


def with_restarts(config: Config, checkpoint: Path | None,
                  attempt: Callable[[Path | None, int, StopSignals], RunResult]) -> RunResult:
    """``attempt(checkpoint, restarts, stop)`` under SIGINT/SIGTERM handling; when it loses the trainer (or a worker
    for good), again from the newest checkpoint (from the start if there is none), up to ``runtime.max_restarts``."""
    restarts = 0
    with StopSignals() as stop:
        while True:
            try:
                return attempt(checkpoint, restarts, stop)
            except (TrainerLost, WorkerGone) as e:
                if restarts >= config.runtime.max_restarts:
                    raise RuntimeError(f"{e}; not restarting: runtime.max_restarts={config.runtime.max_restarts} "
                                       f"restarts used") from e
                restarts += 1
                checkpoint = Checkpoints(Path(config.run_dir) / "checkpoints").latest()
                if checkpoint is None:  # lost before the first checkpoint: nothing worth keeping was done yet
                    prepare_run_dir(config, resume=False, overwrite=True)
                where = "the start" if checkpoint is None else checkpoint.name
                _note(Path(config.run_dir), f"{e}: restarting from {where} (restart {restarts} of "
                                            f"{config.runtime.max_restarts})")


def _note(run_dir: Path, line: str) -> None:
    print(line, file=sys.stderr)
    with open(run_dir / "notes.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _run(config: Config, task: Task, tokenizer: Any, checkpoint: Path | None, restarts: int, stop: StopSignals) -> RunResult:
    """One attempt at the run: from the start, or from ``checkpoint``."""
    t_start = time.perf_counter()
    if checkpoint is None:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
    run_dir = Path(config.run_dir)
    lat = config.reward_latency
    train_task = with_reward_latency(task, lat.median, lat.sigma, lat.max, config.seed) if lat.median > 0 else task
    tokens = Tokens(tokenizer)
    t, rt = config.train, config.runtime
    tracer = Tracer(enabled=rt.trace)
    checkpoints = Checkpoints(run_dir / "checkpoints", config.checkpoint.keep)
    meta = read_meta(checkpoint) if checkpoint is not None else None
    saved: dict[str, Any] = torch.load(checkpoint / "state.pt", weights_only=False) if checkpoint is not None else {}

    backend = make_backend(rt)
    ledger = Ledger(run_dir / "ledger.jsonl", append=meta is not None)
    if meta is not None:
        ledger.resumed(meta["step"], meta["ledger_bytes"])
    try:
        workers = spawn_workers(backend, config, train_task)
        rollout, trainer = workers.rollout, workers.trainer

        def publish_and_eval() -> float:
            trainer.publish()
            return evaluate(rollout, task, tokens, config.eval.max_new_tokens, is_agent(config, task),
                                        config.runtime.reward.concurrency)

        resume_at = Resume(meta["step"], meta["metrics_bytes"], meta["rollouts_bytes"], saved["progress"].evals,
                           meta["completed"]) if meta is not None else None
        with Tracker(run_dir, total_steps=config.sft.steps + t.steps, show_progress=config.progress, resume=resume_at) as tracker:
            def save_sft(done: int, progress: Progress, why: str) -> Path:
                return checkpoints.save(done - config.sft.steps, functools.partial(
                    _write_sft_checkpoint, trainer, tracker, ledger, progress, done, why), name=f"sft_{done:06d}")

            in_sft = meta is not None and meta["step"] < 0  # resumed from a checkpoint taken before or during SFT
            if meta is None or in_sft:
                if in_sft:
                    saved["progress"].best.tokenizer = tokenizer
                    _restore_trainer(trainer, checkpoint, saved)
                    tracker.note(f"resumed from {checkpoint} (SFT step {saved['sft_step']} of {config.sft.steps})")
                progress = warm_start(config, workers, task, tokens, tracker, tokenizer, publish_and_eval, stop, save_sft,
                                      saved.get("progress"), saved.get("sft_step", 0))
                controller = build_pipeline(config, workers, train_task, trainer.version(), tracer, ledger)
            else:
                progress = saved["progress"]
                progress.best.tokenizer = tokenizer
                _restore_workers(config, workers, checkpoint, saved)
                controller = build_pipeline(config, workers, train_task, trainer.version(), tracer, ledger)
                controller.restore(saved["controller"], why=f"resumed from checkpoint step {meta['step']}")
                controller.set_staleness(resumed_eta(rt, saved))
                tracker.note(f"resumed from {checkpoint} (step {meta['step']}, version {meta['version']})")
            # Everything built so far (torch, transformers, the model) lives until the end: keep it out of the
            # cyclic collector's scans, whose full passes over it otherwise stall a step now and then.
            gc.freeze()
            auto = AutoStaleness(config, controller, workers, progress.tuner)

            def save_checkpoint(step: int, why: str) -> Path:
                progress.tuner = auto.tuner if auto.tuner is not None and auto.tuner.settled else None
                return checkpoints.save(step, functools.partial(_write_checkpoint, workers, controller, tracker, ledger,
                                                                progress, config.sft.steps + step, why))

            if meta is None or in_sft:
                save_checkpoint(0, "after SFT")
            history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
            rl_start, last = time.perf_counter(), time.perf_counter()
            steps = controller.run(t.steps)
            try:
                for result in steps:
                    step, rows = result.step, [row for g in result.groups for row in g]
                    now = time.perf_counter()
                    elapsed, last = now - last, now
                    record = step_record(result, elapsed)
                    if (note := auto.observe(result)) is not None:
                        tracker.note(note)
                    for line in controller.fault_log:  # every infrastructure fault: printed, kept in notes.log
                        tracker.note(f"fault: {line}")
                    controller.fault_log.clear()
                    if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
                        progress.acc = evaluate(rollout, task, tokens, config.eval.max_new_tokens, is_agent(config, task),
                                        config.runtime.reward.concurrency)
                        record["eval/accuracy"] = progress.acc
                        progress.best.offer(step, progress.acc, rollout)
                    tracker.log_step(step, record)
                    tracker.log_rollouts([{
                        "uid": row.uid, "step": step, "group": row.group_id, "version": row[TRAJECTORY].version,
                        "prompt": row[TASK].prompt, "response": row[TRAJECTORY].text,
                        "reward": row[REWARD].result.reward, "breakdown": row[REWARD].result.breakdown, "status": row.status.value,
                        **({"turns": row[TRAJECTORY].info["transcript"]} if "transcript" in row[TRAJECTORY].info else {}),
                    } for row in rows])
                    history.append({"step": step, **record})
                    finite = math.isfinite(record["train/loss"])
                    progress.nonfinite_streak = 0 if finite else progress.nonfinite_streak + 1
                    if progress.nonfinite_streak >= t.max_nonfinite_steps:
                        # Skipped updates leave the weights as they were: the checkpoint holds the last good ones.
                        path = save_checkpoint(step, "non-finite loss")
                        raise NonFiniteLoss(
                            f"{progress.nonfinite_streak} steps in a row (the last: step {step}) had no finite loss or "
                            f"gradient (train/nonfinite_updates), so none was applied; checkpoint {path}; lower "
                            f"train.lr or check the reward's scale, then `rollflow train --resume {run_dir}`")
                    if stop.requested is not None:
                        path = save_checkpoint(step, f"stopped by {stop.requested}")
                        raise Stopped(f"stopped by {stop.requested} after step {step}; checkpoint {path}; continue with "
                                      f"`rollflow train --resume {run_dir}`")
                    if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == t.steps:
                        save_checkpoint(step, "periodic" if step < t.steps else "final")
            except (TrainerLost, WorkerGone, Stopped, NonFiniteLoss, KeyboardInterrupt):
                raise
            except Exception as e:
                # A user error (a reward that raised) or a bug: keep what was finished since the last checkpoint.
                if controller.between_steps and controller.trained > 0:
                    path = save_checkpoint(controller.trained, f"stopped by {type(e).__name__}")
                    e.add_note(f"checkpoint of step {controller.trained} written to {path}: fix the cause, then "
                               f"`rollflow train --resume {run_dir}`")
                raise
            controller.close()
            rl_seconds = time.perf_counter() - rl_start

            if not config.eval.keep_best:
                trainer.save(functools.partial(_save, tokenizer, run_dir / "model"))
            summary = run_summary(config, progress, auto, controller, meta["step"] if meta else None, restarts,
                                  time.perf_counter() - t_start, rl_seconds)
            if rt.trace:
                tracer.write(run_dir / "trace.json")
            tracker.finish(summary)
    finally:
        ledger.close()
        backend.shutdown()
    return RunResult(run_dir, summary, history)


def run_summary(config: Config, progress: Progress, auto: AutoStaleness, controller: Controller,
                resumed_from: int | None, restarts: int, wall_seconds: float, rl_seconds: float) -> dict[str, Any]:
    """``summary.json``: accuracies, what the run chose, its faults, and the pipeline's timing over this attempt
    (from the checkpoint it ``resumed_from``, if it did)."""
    t, rt = config.train, config.runtime
    first_step = resumed_from or 0
    pipeline = controller.pipeline_summary() if t.steps > first_step else {}
    return {
        "accuracy_initial": progress.acc_initial,
        "accuracy_after_sft": progress.acc_sft,
        "accuracy_final": progress.acc,
        "accuracy_best": progress.best.accuracy,
        "best_step": progress.best.step if config.eval.keep_best else None,  # ≤ 0: before RL (0 = after SFT)
        "saved_model": "best" if config.eval.keep_best else "final",
        "steps": t.steps,
        "samples": t.steps * config.samples_per_step,
        "backend": rt.backend,
        "staleness": rt.staleness,
        "staleness_chosen": auto.chosen,  # the η the run trained at (auto: after its first auto_steps steps)
        "staleness_reason": auto.reason,
        "resumed_from_step": resumed_from,  # this attempt's start (None: from the beginning)
        "restarts": restarts,  # times the trainer died and the run went back to a checkpoint
        "wall_seconds": wall_seconds,  # this attempt's
        "sft_seconds": progress.sft_seconds,  # the SFT steps alone, without evaluations
        "rl_seconds": rl_seconds,  # includes evaluations; pipeline_seconds does not count the last one
        "samples_per_second": (controller.trained - first_step) * config.samples_per_step / pipeline["pipeline_seconds"]
        if pipeline else 0.0,
        "infra_retries": controller.infra_retries,
        "faults": dict(controller.faults),
        "dropped_groups": controller.dropped_groups,
        "rejected_groups": controller.rejected_groups,
        **pipeline,
    }


def warm_start(config: Config, workers: Workers, task: Task, tokens: Tokens, tracker: Tracker, tokenizer: Any,
               publish_and_eval: Callable[[], float], stop: StopSignals,
               save_sft: Callable[[int, Progress, str], Path], resumed: Progress | None = None, done: int = 0) -> Progress:
    """Before RL: the initial evaluation, SFT and its evaluation; then the trainer, critic and reference set up
    for RL. A run resumed inside SFT passes the ``resumed`` progress and the SFT steps ``done``."""
    rt = config.runtime
    rollout, trainer = workers.rollout, workers.trainer
    progress = resumed
    if progress is None:
        best = BestModel(Path(config.run_dir) / "model" if config.eval.keep_best else None, tokenizer)
        acc_initial = publish_and_eval()
        tracker.log_eval(0, acc_initial, "initial")
        best.offer(-config.sft.steps, acc_initial, rollout)
        progress = Progress(acc_initial, acc_initial, 0.0, best, list(tracker.evals), acc_initial)
        if config.sft.steps and config.checkpoint.sft_every:
            save_sft(0, progress, "before SFT")
    if config.sft.steps:
        if (warning := demonstrations_cut(task, tokens, config)) is not None:
            tracker.note(warning)
        trainer.set_threads(config.sft.torch_threads)
        sft_start = time.perf_counter()
        run_sft(trainer, task, tokens, config, tracker, tokenizer.pad_token_id, stop, done,
                functools.partial(_save_sft_progress, save_sft, progress, sft_start) if config.checkpoint.sft_every else None)
        progress.sft_seconds += time.perf_counter() - sft_start
        progress.acc_sft = progress.acc = publish_and_eval()
        tracker.log_eval(0, progress.acc_sft, "after SFT")
        progress.evals = list(tracker.evals)
        progress.best.offer(0, progress.acc_sft, rollout)
    if rt.backend != "inline":  # inline workers share the driver's threads
        trainer.set_threads(role_threads(rt, first_staleness(rt))[1])
    trainer.set_lr(config.train.lr)
    trainer.init_critic()
    if workers.reference is not None:
        workers.transport.pin(REFERENCE_WEIGHTS)  # the policy RL starts from (published just above)
        workers.reference.freeze()
    return progress


def demonstrations_cut(task: Task, tokens: Tokens, config: Config, sample: int = 256) -> str | None:
    """A warning when ``rollout.max_new_tokens`` is too short for the demonstrations' turns (EOS included): the policy
    would imitate responses it can never finish, and RL, seeing them cut, unlearns stopping."""
    stream, demonstration = task.train_problems(config.seed + 1), getattr(task, "demonstration", None)
    longest = 0
    for _ in range(sample):
        p = next(stream)
        turns = demonstration(p) if callable(demonstration) else [("model", task.reference(p))]
        longest = max([longest, *(len(tokens.target(text)) for source, text in turns if source == "model")])
    if longest <= config.rollout.max_new_tokens:
        return None
    return (f"warning: rollout.max_new_tokens={config.rollout.max_new_tokens} is shorter than the demonstrations' "
            f"turns ({longest} tokens with EOS, in {sample} sampled): responses will be cut; raise it to {longest}")


def _save_sft_progress(save_sft: Callable[[int, Progress, str], Path], progress: Progress, started: float,
                       done: int, why: str) -> Path:
    """An SFT checkpoint after ``done`` steps, with the SFT seconds counted so far."""
    return save_sft(done, dataclasses.replace(progress, sft_seconds=progress.sft_seconds + time.perf_counter() - started), why)


def _restore_workers(config: Config, workers: Workers, checkpoint: Path, saved: dict[str, Any]) -> None:
    """Put the workers back where an RL checkpoint left them: the trainer (``_restore_trainer``), the reference
    weights, each rollout engine's sampling RNG, and the threads of the η the run resumes at."""
    rt = config.runtime
    _restore_trainer(workers.trainer, checkpoint, saved)
    if workers.reference is not None:
        workers.transport.pin(REFERENCE_WEIGHTS, torch.load(checkpoint / "reference.pt", weights_only=False))
        workers.reference.freeze()
    for i, state in enumerate(saved["rollout_rng"][: len(workers.rollout)]):
        workers.rollout.call(i, "set_rng_state", state)
    if rt.backend != "inline":
        rollout_threads, trainer_threads = role_threads(rt, resumed_eta(rt, saved))
        workers.rollout.set_threads(rollout_threads)
        workers.trainer.set_threads(trainer_threads)


def resumed_eta(rt: RuntimeConfig, saved: dict[str, Any]) -> int:
    """η after a resume: the configured one if it is a number (it may change on resume), else the one the run had."""
    return saved["controller"]["eta"] if rt.staleness == "auto" else int(rt.staleness)


def _restore_trainer(trainer: WorkerGroup, checkpoint: Path, saved: dict[str, Any]) -> None:
    """The trainer's state from any checkpoint, published as its version; this process's RNGs."""
    trainer.load_state(str(checkpoint / "trainer.pt"))
    trainer.publish()
    random.setstate(saved["python_rng"])
    torch.set_rng_state(saved["torch_rng"])


def _write_sft_checkpoint(trainer: WorkerGroup, tracker: Tracker, ledger: Ledger, progress: Progress, done: int,
                          why: str, folder: Path) -> dict[str, Any]:
    """A checkpoint before or during SFT: the trainer's state, the SFT steps done, the recipe's progress, the RNGs
    (nothing else has changed yet: no sample was admitted)."""
    return {**_write_trainer_and_driver(trainer, tracker, ledger, progress, done, why, folder, sft_step=done),
            "sft_step": done}


def _write_checkpoint(workers: Workers, controller: Controller, tracker: Tracker, ledger: Ledger, progress: Progress,
                      completed: int, why: str, folder: Path) -> dict[str, Any]:
    """An RL checkpoint: besides what every checkpoint holds, the reference weights, the controller and its store,
    and each rollout engine's sampling RNG."""
    if workers.reference is not None:
        torch.save(workers.transport.pinned(REFERENCE_WEIGHTS), folder / "reference.pt")
    return _write_trainer_and_driver(workers.trainer, tracker, ledger, progress, completed, why, folder,
                                     controller=controller.snapshot(), rollout_rng=workers.rollout.rng_state())


def _write_trainer_and_driver(trainer: WorkerGroup, tracker: Tracker, ledger: Ledger, progress: Progress,
                              completed: int, why: str, folder: Path, **state: Any) -> dict[str, Any]:
    """What every checkpoint holds (see ``Checkpoints.save``): the trainer's state (written by the trainer), the
    driver's ``state`` with the recipe's progress and this process's RNGs, and for ``meta.json`` the lengths of the
    files a resume cuts back to."""
    version = trainer.save_state(str(folder / "trainer.pt"))
    state |= {"python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
              "progress": dataclasses.replace(progress, best=dataclasses.replace(progress.best, tokenizer=None))}
    torch.save(state, folder / "state.pt")
    metrics_bytes, rollouts_bytes = tracker.sizes()
    return {"version": version, "why": why, "ledger_bytes": ledger.size(), "metrics_bytes": metrics_bytes,
            "rollouts_bytes": rollouts_bytes, "completed": completed}
