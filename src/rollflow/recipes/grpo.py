"""GRPO for language models: optional SFT warm start, then group-relative policy optimisation.

The whole run in one function, top to bottom: build task and model → build worker groups, store and staleness
budget → evaluate → SFT → RL loop (admit → produce → take complete groups → train → publish → sync) → save.
The same wiring runs on any backend; the inline one keeps every worker in this process.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from rollflow.algos import ADVANTAGES, policy_loss_fn, sft_loss
from rollflow.api import Problem, RewardFn, SamplingParams, Task
from rollflow.config import Config, dump_config
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.engines.models import TinyModelSpec, char_tokenizer, load_pretrained, save_pretrained, tiny_model
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import RewardWorker, RolloutWorker, TrainerWorker
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.tracking import Tracker
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.tasks import build_task
from rollflow.tasks.reward_fn import call_reward_fn


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
    """Greedy accuracy on the held-out set: the share of problems whose response earns the full reward (≥ 1)."""
    problems = task.eval_problems()
    params = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    gens = rollout.generate([(i, tokens.prompt(p.prompt)) for i, p in enumerate(problems)], params)
    return sum(task.verify(problems[g.uid], g.generation.response_text).reward >= 1.0 for g in gens) / len(problems)


def build_model(config: Config, task: Task) -> tuple[Any, Any]:
    if config.model.path:
        return load_pretrained(config.model.path)
    m = config.model
    tokenizer = char_tokenizer(task.alphabet())
    spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
    return tiny_model(spec, tokenizer, config.seed), tokenizer


def run_sft(trainer: WorkerGroup, task: Task, tokens: Tokens, config: Config, tracker: Tracker) -> None:
    """Supervised warm start on reference solutions, lr decayed linearly to zero."""
    stream = task.train_problems(config.seed + 1)
    engine = trainer.workers[0].engine
    for step in range(config.sft.steps):
        engine.set_lr(config.sft.lr * (1 - step / config.sft.steps))
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
    model, tokenizer = build_model(config, task)
    tokens = Tokens(tokenizer)
    r, t = config.rollout, config.train

    # Workers: the rollout engines hold their own copy of the weights and only ever change them by version.
    transport = InlineWeightTransport()
    params = SamplingParams(temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
    rollout = WorkerGroup("rollout", [
        RolloutWorker(HFInferenceEngine(copy.deepcopy(model), tokenizer, config.runtime.max_generate_batch, config.seed + i), transport, params)
        for i in range(config.runtime.rollout_workers)
    ])
    reward = WorkerGroup("reward", [RewardWorker(task.verify) for _ in range(config.runtime.reward_workers)])
    engine = TorchTrainEngine(model, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip, temperature=r.temperature, seed=config.seed)
    a = config.algo
    trainer = WorkerGroup("trainer", [TrainerWorker(
        engine, transport, tokenizer.pad_token_id,
        advantage_fn=lambda rewards: ADVANTAGES.get(a.advantage)(rewards, scale_by_std=a.scale_by_std),
        loss_fn=policy_loss_fn(a.loss, a.aggregation, a.entropy_coef, clip_low=a.clip_low, clip_high=a.clip_high),
        minibatches=t.minibatches_per_step, epochs=t.epochs_per_step,
    )])

    def sync_and_eval() -> float:
        trainer.publish()
        rollout.sync_weights()
        return evaluate(rollout, task, tokens, config.eval.max_new_tokens)

    history: list[dict[str, Any]] = []
    with Tracker(run_dir, total_steps=config.sft.steps + t.steps, show_progress=config.progress) as tracker:
        acc_initial = sync_and_eval()
        tracker.log_eval(0, acc_initial, "initial")
        acc_sft = acc_initial
        if config.sft.steps:
            run_sft(trainer, task, tokens, config, tracker)
            acc_sft = sync_and_eval()
            tracker.log_eval(0, acc_sft, "after SFT")
        engine.set_lr(t.lr)

        store, budget = SampleStore(), StalenessBudget(config.runtime.staleness, config.samples_per_step)
        controller = Controller(store, budget, rollout, reward, task.train_problems(config.seed), tokens.prompt, r.samples_per_prompt)
        v0 = engine.version
        acc, rl_start = acc_sft, time.perf_counter()
        for step in range(1, t.steps + 1):
            t0 = time.perf_counter()
            controller.admit(engine.version - v0)
            times = controller.produce()
            groups = controller.next_batch(r.prompts_per_step)
            t1 = time.perf_counter()
            metrics = trainer.train(groups)
            times["train"] = time.perf_counter() - t1
            rollout.sync_weights()
            elapsed = time.perf_counter() - t0

            rows = [row for g in groups for row in g]
            rewards = torch.tensor([row.reward.result.reward for row in rows])
            n_tokens = sum(len(row.generation.response_ids) for row in rows)
            record: dict[str, Any] = {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item(),
                **{f"reward/{k}": sum(row.reward.result.breakdown.get(k, 0.0) for row in rows) / len(rows)
                   for k in rows[0].reward.result.breakdown},
                "train/loss": metrics.pop("loss"),
                **{f"train/{k}": v for k, v in metrics.items() if "/" not in k},
                **{k: v for k, v in metrics.items() if "/" in k},
                "response/length": n_tokens / len(rows),
                "throughput/samples_per_s": len(rows) / elapsed,
                "throughput/tokens_per_s": n_tokens / elapsed,
                **{f"time/{k}": v for k, v in times.items()},
                "time/step": elapsed,
                **{f"store/{k}": v for k, v in store.counts().items()},
                "version": engine.version,
            }
            if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
                acc = evaluate(rollout, task, tokens, config.eval.max_new_tokens)
                record["eval/accuracy"] = acc
            tracker.log_step(step, record)
            tracker.log_rollouts([{
                "uid": row.uid, "step": step, "group": row.group_id, "version": row.generation.versions[0] if row.generation.versions else None,
                "prompt": row.prompt.problem.prompt, "response": row.generation.response_text,
                "reward": row.reward.result.reward, "breakdown": row.reward.result.breakdown, "status": row.status.value,
            } for row in rows])
            history.append({"step": step, **record})

        save_pretrained(engine.model, tokenizer, run_dir / "model")
        rl_seconds = time.perf_counter() - rl_start
        summary = {
            "accuracy_initial": acc_initial,
            "accuracy_after_sft": acc_sft,
            "accuracy_final": acc,
            "steps": t.steps,
            "samples": t.steps * config.samples_per_step,
            "wall_seconds": time.perf_counter() - t_start,
            "rl_seconds": rl_seconds,
            "samples_per_second": t.steps * config.samples_per_step / rl_seconds if t.steps else 0.0,
            "infra_retries": controller.infra_retries,
        }
        tracker.finish(summary)
    return RunResult(run_dir, summary, history)
