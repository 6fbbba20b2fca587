"""PPO / APPO / REINFORCE for simulator agents: actor workers stepping Gymnasium environments, a policy trainer.

The same runtime as the language-model recipe, read top to bottom: check the environment → spawn actor workers (each
a rollout worker running ``workflows.VectorFragments`` on its own copy of the policy) and the trainer → the
controller's streaming loop (admit a call's worth of fragments within the staleness budget → actors step their
environments → the trainer takes ``sim.calls_per_step`` calls' fragments → PPO/V-trace step → publish; actors pick
the new version up between two environment steps) → held-out evaluation → save. Batch sizes, in one place:

- a **call** steps ``sim.envs_per_actor`` environments for ``sim.fragment_steps`` steps: that many fragments (a group
  of the store);
- a **train step** takes ``sim.calls_per_step`` calls: envs_per_actor × fragment_steps × calls_per_step env steps,
  cut into ``train.minibatches_per_step`` minibatches, ``train.epochs_per_step`` times.

``runtime.staleness`` bounds how many versions an action may lag the trainer (``auto``: 1 on Ray, where actors and
trainer overlap; 0 inline). Evaluation runs greedy (or sampled) episodes in the driver on environment seeds from
``sim.eval_seed`` on, which no training environment uses (actor ``i`` seeds its environments from
``seed·10⁶ + i·10⁴``), in the held-out environments and in each of ``sim.eval_sets``.

Not covered: continuous actions, recurrent policies; environment state is not checkpointed (a resumed run starts
fresh environments, from seeds shifted by the step it resumes at).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rollflow.algos.imitation import bc_loss, demonstration_batch
from rollflow.algos.pg import PolicyGradientStep
from rollflow.algos.ppo import APPOStep, PPOStep
from rollflow.api import Column, Status, TrainStep
from rollflow.config import Config, ConfigError
from rollflow.config.schema import SimConfig
from rollflow.engines.policy import ActorCriticCNN, ActorCriticMLP, TorchPolicyEngine, TorchPolicyTrainer
from rollflow.envs.simulator import EnvSpec, env_spec, load_entry_point, make_env
from rollflow.recipes.grpo import (
    NonFiniteLoss,
    RunResult,
    Stopped,
    StopSignals,
    cores,
    make_backend,
    prepare_run_dir,
    with_restarts,
)
from rollflow.runtime.backend import Backend, Payloads, Peer, Resources, WorkerGone
from rollflow.runtime.checkpoint import Checkpoints, read_meta
from rollflow.runtime.controller import Controller, StepResult, TrainerLost
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.ledger import Ledger
from rollflow.runtime.policy import PolicyWorker, RemotePolicy
from rollflow.runtime.roles import TrainerWorker
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.stage import Stage
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.trace import Tracer
from rollflow.runtime.tracking import Resume, Tracker, read_metrics
from rollflow.workflows import VectorFragments

TASK, FRAGMENT = "task", "fragment"
SEEDS_PER_ACTOR = 10_000  # environments an actor may make (replacements included) before the next actor's seeds


def build_policy(sim: SimConfig, spec: EnvSpec, seed: int) -> torch.nn.Module:
    """The actor-critic the config asks for (``sim.policy=auto``: a CNN for image observations, else an MLP; or the
    user's class, ``module:Class``)."""
    if ":" in sim.policy:
        cls = load_entry_point(sim.policy, "sim.policy")
        extra = {"normalize_rewards": True} if sim.normalize_rewards else {}
        try:
            model = cls(tuple(spec.observation_shape), spec.actions, seed=seed, **extra, **sim.policy_kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sim.policy={sim.policy!r} could not be built for {sim.env}'s observations "
                              f"{tuple(spec.observation_shape)} and {spec.actions} actions: {e}") from e
        missing = [m for m in ("forward", "value") if not callable(getattr(model, m, None))]
        if not isinstance(model, torch.nn.Module) or missing:
            raise ConfigError(f"sim.policy={sim.policy!r} must build a torch.nn.Module with forward(obs) → logits and "
                              f"value(obs) → values; it built a {type(model).__name__}")
        return model
    cnn = sim.policy == "cnn" or (sim.policy == "auto" and spec.image)
    if cnn:
        if len(spec.observation_shape) < 3:
            raise ConfigError(f"sim.policy=cnn needs image observations (H, W, C); {sim.env} gives "
                              f"{spec.observation_shape}: use sim.policy=mlp (or auto)")
        return ActorCriticCNN(spec.observation_shape, spec.actions, tuple(sim.channels), sim.hidden[-1], seed,
                              normalize_rewards=sim.normalize_rewards)
    obs_dim = math.prod(spec.observation_shape)
    return ActorCriticMLP(obs_dim, spec.actions, tuple(sim.hidden), seed, normalize=sim.normalize_observations,
                          normalize_rewards=sim.normalize_rewards)


def build_step(config: Config) -> TrainStep:
    """The trainer's step for ``sim.algorithm``."""
    sim, t = config.sim, config.train
    assert sim is not None
    common = dict(entropy_coef=sim.entropy_coef, minibatches=t.minibatches_per_step, epochs=t.epochs_per_step,
                  column=FRAGMENT)
    if sim.algorithm == "pg":
        step: TrainStep = PolicyGradientStep(gamma=sim.gamma, **common)
    elif sim.algorithm == "appo":
        step = APPOStep(gamma=sim.gamma, clip=sim.clip, rho_bar=sim.rho_bar, c_bar=sim.c_bar, value_clip=sim.value_clip,
                        value_coef=sim.value_coef, normalize_advantages=sim.normalize_advantages,
                        normalize_rewards=sim.normalize_rewards, kl_coef=sim.kl_coef,
                        kl_decay_steps=sim.kl_decay_steps, **common)
    else:
        step = PPOStep(gamma=sim.gamma, lam=sim.lam, clip=sim.clip, value_clip=sim.value_clip, value_coef=sim.value_coef,
                       normalize_advantages=sim.normalize_advantages, normalize_rewards=sim.normalize_rewards,
                       kl_coef=sim.kl_coef, kl_decay_steps=sim.kl_decay_steps, **common)
    return step


def actor_seed(config: Config, actor: int, resumed_at: int = 0) -> int:
    """The first environment seed of actor ``actor``: every actor's range lies below ``sim.eval_seed``."""
    return config.seed * 1_000_000 + actor * SEEDS_PER_ACTOR + resumed_at * 97


def _actor(config: Config, spec: EnvSpec, index: int, transport: Any, payloads: Payloads, threads: int,
           resumed_at: int, peer: Peer | None) -> RolloutWorker:
    sim = config.sim
    assert sim is not None
    torch.set_num_threads(threads)
    engine = RemotePolicy(peer) if peer is not None else TorchPolicyEngine(build_policy(sim, spec, config.seed),
                                                                             seed=config.seed * 7919 + index)
    make = functools.partial(make_env, sim.env, sim.env_kwargs, sim.frame_stack, sim.step_cost)
    workflow = VectorFragments(make, sim.fragment_steps, actor_seed(config, index, resumed_at), sim.step_timeout)
    return RolloutWorker(engine, transport, workflow, payloads=payloads, threads=threads,
                         limits=Limits(engine=config.rollout.engine_timeout))


def _policy_worker(config: Config, spec: EnvSpec, index: int, transport: Any, threads: int) -> PolicyWorker:
    assert config.sim is not None
    torch.set_num_threads(threads)
    engine = TorchPolicyEngine(build_policy(config.sim, spec, config.seed), seed=config.seed * 7919 + 5000 + index)
    return PolicyWorker(engine, transport, threads)


def _trainer(config: Config, spec: EnvSpec, transport: Any, payloads: Payloads, threads: int) -> TrainerWorker:
    sim, t = config.sim, config.train
    assert sim is not None
    torch.set_num_threads(threads)
    engine = TorchPolicyTrainer(build_policy(sim, spec, config.seed), lr=t.lr, weight_decay=t.weight_decay,
                                grad_clip=t.grad_clip, seed=config.seed, anneal_steps=t.steps if sim.anneal_lr else 0)
    return TrainerWorker(engine, transport, build_step(config), payloads)


@dataclass
class SimWorkers:
    actors: WorkerGroup
    trainer: WorkerGroup
    transport: Any
    policy: WorkerGroup | None = None  # sim.inference=policy_workers


def spawn_workers(backend: Backend, config: Config, spec: EnvSpec, resumed_at: int) -> SimWorkers:
    """Actor workers (replaced by the backend if one dies) and the trainer, with their torch threads: one per actor
    (small policies), the rest of the cores for the trainer, unless configured."""
    rt = config.runtime
    transport, payloads = backend.weight_transport(), backend.payloads
    n = rt.rollout.workers
    actor_threads = rt.rollout.torch_threads or 1
    trainer_threads = rt.trainer.torch_threads or (rt.torch_threads if rt.backend == "inline" else max(1, cores(rt) - n))
    servers = config.sim.policy_workers if config.sim.inference == "policy_workers" else 0
    actor_cpus = rt.rollout.num_cpus
    if rt.backend == "ray" and rt.address is None and (n + servers) * actor_cpus > cores(rt) - rt.trainer.num_cpus:
        # More actors than this machine's cores: Ray would never schedule the last ones (nor the trainer). They
        # share the cores instead, as processes do.
        actor_cpus = max(0.0, cores(rt) - rt.trainer.num_cpus) / (n + servers)
    policy, peers = None, [None] * n
    if servers:
        policy = WorkerGroup.spawn(backend, "policy", PolicyWorker, [
            functools.partial(_policy_worker, config, spec, j, transport, actor_threads) for j in range(servers)
        ], Resources(actor_cpus, actor_threads, concurrency=1000, restartable=True))  # every actor's requests at once
        peers = [backend.peer(policy.workers[i % servers]) for i in range(n)]
    actors = WorkerGroup.spawn(backend, "actor", RolloutWorker, [
        functools.partial(_actor, config, spec, i, transport, payloads, actor_threads, resumed_at, peers[i])
        for i in range(n)
    ], Resources(actor_cpus, actor_threads, concurrency=rt.rollout.concurrency + 1, restartable=True))
    trainer = WorkerGroup.spawn(backend, "trainer", TrainerWorker, [
        functools.partial(_trainer, config, spec, transport, payloads, trainer_threads)
    ], Resources(rt.trainer.num_cpus, trainer_threads))
    backend.wait_started(actors.workers + trainer.workers + (policy.workers if policy else []))
    return SimWorkers(actors, trainer, transport, policy)


def staleness(config: Config) -> int:
    rt = config.runtime
    if rt.staleness == "auto":
        return 0 if rt.backend == "inline" else 1
    return int(rt.staleness)


def build_pipeline(config: Config, workers: SimWorkers, version: int, tracer: Tracer, ledger: Ledger) -> Controller:
    """One column of fragments: each admitted group is one actor call's environments; the trainer takes
    ``sim.calls_per_step`` of them."""
    sim, rt = config.sim, config.runtime
    assert sim is not None
    store = SampleStore([Column(TASK), Column(FRAGMENT, (TASK,), versioned=True)])
    stage = Stage(FRAGMENT, workers.actors, "rollout", lambda uid, cells: (uid, cells[TASK]), groups_per_call=1,
                  calls_per_worker=rt.rollout.concurrency)
    return Controller(store, StalenessBudget(staleness(config), sim.envs_per_actor * sim.calls_per_step), [stage],
                      workers.trainer, itertools.count(), group_size=sim.envs_per_actor,
                      groups_per_step=sim.calls_per_step, version=version, max_retries=rt.max_retries, tracer=tracer,
                      call_timeout=rt.call_timeout, ledger=ledger)


# -- evaluation ---------------------------------------------------------------------------------------------------------
def evaluate_all(config: Config, spec: EnvSpec, weights: Any) -> dict[str, float]:
    """``evaluate`` on the held-out environments (``eval/…``) and on each of ``sim.eval_sets`` (``eval/<name>/…``)."""
    sim = config.sim
    assert sim is not None
    metrics = evaluate(config, spec, weights)
    for name, kwargs in sim.eval_sets.items():
        metrics.update(evaluate(config, spec, weights, {**sim.env_kwargs, **kwargs}, f"eval/{name}"))
    return metrics


@torch.no_grad()
def evaluate(config: Config, spec: EnvSpec, weights: Any, env_kwargs: dict[str, Any] | None = None,
             prefix: str = "eval") -> dict[str, float]:
    """Episodes of the policy ``weights`` (greedy; sampled with ``sim.eval_greedy=false``) on ``sim.eval_episodes``
    environments seeded ``sim.eval_seed``, ``+1``, … (seeds no training environment uses), made with ``env_kwargs``
    (default: ``sim.eval_env_kwargs`` over ``sim.env_kwargs``), all stepped together: mean return and length, and
    success (the environment's ``info["success"]``, else a return reaching ``sim.target_return`` if set, or a
    positive one), also per task kind when ``info`` names it (``info["interaction"]``); keys ``<prefix>/…``."""
    sim = config.sim
    assert sim is not None
    model = build_policy(sim, spec, config.seed)
    model.load_state_dict(weights.tensors)
    model.eval()
    kwargs = {**sim.env_kwargs, **sim.eval_env_kwargs} if env_kwargs is None else env_kwargs
    envs = [make_env(sim.env, kwargs, sim.frame_stack) for _ in range(sim.eval_episodes)]
    obs = [torch.as_tensor(e.reset(seed=sim.eval_seed + j)[0], dtype=torch.float32) for j, e in enumerate(envs)]
    returns, lengths, infos = [0.0] * len(envs), [0] * len(envs), [{} for _ in envs]
    generator = torch.Generator().manual_seed(sim.eval_seed)
    live, failed = list(range(len(envs))), set()
    while live:
        logits = model(torch.stack([obs[j] for j in live]))  # (L, A)
        if sim.eval_greedy:
            actions = logits.argmax(-1)
        else:  # sampled, from a generator of its own: the same weights give the same episodes
            actions = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        still = []
        for j, a in zip(live, actions.tolist()):
            try:
                o, r, terminated, truncated, infos[j] = envs[j].step(a)
            except Exception:  # the environment's fault, not the policy's: the episode is left out and counted
                failed.add(j)
                continue
            returns[j] += float(r)
            lengths[j] += 1
            obs[j] = torch.as_tensor(o, dtype=torch.float32)
            if not (terminated or truncated):
                still.append(j)
        live = still
    for e in envs:
        e.close()
    kept = [j for j in range(len(envs)) if j not in failed]
    if not kept:
        raise RuntimeError(f"every held-out episode's environment ({sim.env}) raised during evaluation")
    target = sim.target_return

    def succeeded(j: int) -> bool:  # the environment's own word (info["success"]) if it gives one
        if "success" in infos[j]:
            return bool(infos[j]["success"])
        return returns[j] >= target if target is not None else returns[j] > 0

    success = {j: succeeded(j) for j in kept}
    metrics = {f"{prefix}/return_mean": sum(returns[j] for j in kept) / len(kept),
               f"{prefix}/length_mean": sum(lengths[j] for j in kept) / len(kept),
               f"{prefix}/success": sum(success.values()) / len(success), f"{prefix}/failed_episodes": len(failed)}
    kinds = sorted({str(infos[j]["interaction"]) for j in kept if "interaction" in infos[j]})
    for kind in kinds:  # a multi-task environment names each episode's kind of task
        mine = [success[j] for j in kept if infos[j].get("interaction") == kind]
        metrics[f"{prefix}/success/{kind}"] = sum(mine) / len(mine)
    return metrics


# -- behaviour cloning --------------------------------------------------------------------------------------------------
def demonstrations(config: Config, spec: EnvSpec) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``sim.bc_episodes`` episodes of the demonstrator (``sim.demonstrator``: a function of the environment that
    returns its action) on training environments: observations (N, *obs), actions (N,), and its success rate."""
    sim = config.sim
    assert sim is not None and sim.demonstrator is not None
    act = load_entry_point(sim.demonstrator, "sim.demonstrator")
    env = make_env(sim.env, sim.env_kwargs, sim.frame_stack)
    base = env.unwrapped
    observations, actions, successes = [], [], []
    for episode in range(sim.bc_episodes):
        obs, info = env.reset(seed=config.seed * 1_000_000 + 999_000 + episode)
        for _ in range(100_000):
            action = int(act(base))
            observations.append(torch.as_tensor(obs, dtype=torch.float32))
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            if terminated or truncated:
                break
        successes.append(bool(info.get("success", reward > 0)))
    env.close()
    return torch.stack(observations), torch.tensor(actions), sum(successes) / len(successes)


def behaviour_cloning(config: Config, spec: EnvSpec, trainer: WorkerGroup, tracker: Tracker) -> float:
    """``sim.bc_steps`` updates of ``algos.imitation.bc_loss`` on minibatches of ``sim.bc_batch`` demonstrated
    steps at ``sim.bc_lr``; returns the seconds it took (collection included)."""
    sim = config.sim
    assert sim is not None
    started = time.perf_counter()
    observations, actions, success = demonstrations(config, spec)
    tracker.note(f"behaviour cloning: {len(actions)} demonstrated steps from {sim.bc_episodes} episodes of "
                 f"{sim.demonstrator} (its success {success:.2f})")
    generator = torch.Generator().manual_seed(config.seed)
    for step in range(sim.bc_steps):
        index = torch.randint(len(actions), (min(sim.bc_batch, len(actions)),), generator=generator)
        m = trainer.call(0, "sft", demonstration_batch(observations[index], actions[index]), bc_loss, sim.bc_lr)
        if (step + 1) % 100 == 0 or step == sim.bc_steps - 1:
            tracker.log_step(step + 1 - sim.bc_steps, {"bc/nll": m["loss"]}, advance=0)
    return time.perf_counter() - started


# -- the run ------------------------------------------------------------------------------------------------------------
@dataclass
class SimProgress:
    """What the recipe carries from step to step, saved in every checkpoint."""

    env_steps: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # returns of the last finished training episodes
    reached_target: float | None = None  # training seconds when the recent mean first reached sim.target_return
    train_seconds: float = 0.0  # RL time so far (evaluations excluded), over every attempt
    bc_seconds: float = 0.0  # behaviour cloning (collecting the demonstrations and training on them)
    evals: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_streak: int = 0


def step_record(result: StepResult, progress: SimProgress, elapsed: float) -> dict[str, Any]:
    """The metrics line of one step: episodes that ended in its fragments, environment throughput, the trainer's
    metrics and the pipeline's."""
    cells = [row[FRAGMENT] for g in result.groups for row in g]
    ok = [c for c in cells if c.status is Status.OK]
    steps = sum(c.size for c in ok)
    returns = [r for c in ok for r in c.info.get("episode_returns", [])]
    lengths = [n for c in ok for n in c.info.get("episode_lengths", [])]
    progress.recent.extend(returns)
    # every fragment of a call carries the call's times: a fragment's share is its time over the call's envs
    env_s = sum(c.info.get("env_seconds", 0.0) / c.info.get("envs", 1) for c in ok)
    infer_s = sum(c.info.get("infer_seconds", 0.0) / c.info.get("envs", 1) for c in ok)
    metrics = dict(result.train.metrics)
    record: dict[str, Any] = {
        "reward/mean": sum(returns) / len(returns) if returns else None,  # the episodes that ended this step
        "episode/return_recent": sum(progress.recent) / len(progress.recent) if progress.recent else None,
        "episode/length_mean": sum(lengths) / len(lengths) if lengths else None,
        "episode/count": len(returns),
        "fragment/dropped": len(cells) - len(ok),
        "train/loss": metrics.pop("loss"),
        **{f"train/{k}": v for k, v in metrics.items() if "/" not in k},
        **{k: v for k, v in metrics.items() if "/" in k and k not in ("episode/count", "episode/return_mean")},
        **result.metrics,
        "env/steps": progress.env_steps + steps,
        "throughput/env_steps_per_s": steps / elapsed,
        "time/actor_env": env_s,  # summed over the step's actor calls
        "time/actor_inference": infer_s,
        "time/train": result.train.finished - result.train.started,
        "time/step": elapsed,
        "version": result.train.version,
    }
    progress.env_steps += steps
    return record


def train(config: Config, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run the simulator recipe ``config.sim`` describes; ``resume`` continues ``config.run_dir`` from its newest
    checkpoint, ``overwrite`` lets a new run replace what the directory holds. A lost trainer sends the run back to
    its last checkpoint, up to ``runtime.max_restarts`` times; a lost actor is replaced without stopping."""
    assert config.sim is not None
    torch.set_num_threads(config.runtime.torch_threads)
    sim = config.sim
    for key in ("env", "policy"):  # workers may run elsewhere than this working directory
        where, _, name = getattr(sim, key).rpartition(":")
        if where.endswith(".py"):
            setattr(sim, key, f"{Path(where).resolve()}:{name}")
    spec = env_spec(sim.env, sim.env_kwargs, sim.frame_stack)  # a bad environment fails before the run dir is touched
    build_policy(sim, spec, config.seed)
    if sim.demonstrator is not None:
        load_entry_point(sim.demonstrator, "sim.demonstrator")
    checkpoint = prepare_run_dir(config, resume, overwrite)
    return with_restarts(config, checkpoint, functools.partial(_run, config, spec))


def _run(config: Config, spec: EnvSpec, checkpoint: Path | None, restarts: int, stop: StopSignals) -> RunResult:
    t_start = time.perf_counter()
    sim, t, rt = config.sim, config.train, config.runtime
    assert sim is not None
    if checkpoint is None:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
    run_dir = Path(config.run_dir)
    tracer = Tracer(enabled=rt.trace)
    checkpoints = Checkpoints(run_dir / "checkpoints", config.checkpoint.keep)
    meta = read_meta(checkpoint) if checkpoint is not None else None
    saved: dict[str, Any] = torch.load(checkpoint / "state.pt", weights_only=False) if checkpoint is not None else {}
    backend = make_backend(rt)
    ledger = Ledger(run_dir / "ledger.jsonl", append=meta is not None)
    if meta is not None:
        ledger.resumed(meta["step"], meta["ledger_bytes"])
    try:
        workers = spawn_workers(backend, config, spec, meta["step"] if meta else 0)
        trainer = workers.trainer
        progress: SimProgress = saved.get("progress") or SimProgress()
        resume_at = Resume(meta["step"], meta["metrics_bytes"], meta["rollouts_bytes"], [], meta["completed"]) \
            if meta is not None else None
        with Tracker(run_dir, total_steps=t.steps, show_progress=config.progress, resume=resume_at) as tracker:
            if meta is not None:
                trainer.load_state(str(checkpoint / "trainer.pt"))
                trainer.publish()
                random.setstate(saved["python_rng"])
                torch.set_rng_state(saved["torch_rng"])
                for i, state in enumerate(saved["actor_rng"][: len(workers.actors)]):
                    workers.actors.call(i, "set_rng_state", state)
                controller = build_pipeline(config, workers, trainer.version(), tracer, ledger)
                controller.restore(saved["controller"], why=f"resumed from checkpoint step {meta['step']}")
                tracker.note(f"resumed from {checkpoint} (step {meta['step']}, version {meta['version']})")
            else:
                trainer.publish()  # version 0: the weights actors start from
                first = evaluate_all(config, spec, workers.transport.latest(newer_than=-1))
                progress.evals.append({"step": 0, "label": "initial", **first})
                tracker.log_eval(0, first["eval/success"], "initial")
                if sim.bc_steps:
                    progress.bc_seconds = behaviour_cloning(config, spec, trainer, tracker)
                    trainer.publish()
                    cloned = workers.transport.latest(newer_than=-1)
                    save_policy(config, spec, cloned, run_dir / "model" / "policy_bc.pt")
                    after = evaluate_all(config, spec, cloned)
                    progress.evals.append({"step": 0, "label": "after BC", **after})
                    tracker.log_eval(0, after["eval/success"], "after BC")
                    if sim.kl_coef > 0:
                        trainer.freeze_reference()
                trainer.set_lr(t.lr)  # RL's phase: the learning rate anneals from here
                controller = build_pipeline(config, workers, trainer.version(), tracer, ledger)

            def save_checkpoint(step: int, why: str) -> Path:
                return checkpoints.save(step, functools.partial(_write_checkpoint, workers, controller, tracker, ledger,
                                                                progress, step, why))

            if meta is None and sim.bc_steps:
                save_checkpoint(0, "after BC")

            history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0]
            last = time.perf_counter()
            try:
                for result in controller.run(t.steps):
                    step = result.step
                    now = time.perf_counter()
                    elapsed, last = now - last, now
                    progress.train_seconds += elapsed
                    record = step_record(result, progress, elapsed)
                    for line in controller.fault_log:
                        tracker.note(f"fault: {line}")
                    controller.fault_log.clear()
                    recent = record["episode/return_recent"]
                    if (sim.target_return is not None and progress.reached_target is None and recent is not None
                            and len(progress.recent) == progress.recent.maxlen and recent >= sim.target_return):
                        progress.reached_target = progress.train_seconds
                        tracker.note(f"the last {len(progress.recent)} training episodes' mean return reached "
                                     f"sim.target_return={sim.target_return} after {progress.train_seconds:.1f} s of "
                                     f"training ({progress.env_steps} env steps, step {step})")
                    if (config.eval.every and step % config.eval.every == 0) or step == t.steps:
                        evaluated = evaluate_all(config, spec, workers.transport.latest(newer_than=-1))
                        record.update(evaluated)
                        record["eval/accuracy"] = evaluated["eval/success"]
                        progress.evals.append({"step": step, **evaluated})
                        last = time.perf_counter()  # evaluation time is not the pipeline's
                    tracker.log_step(step, record)
                    history.append({"step": step, **record})
                    progress.nonfinite_streak = 0 if math.isfinite(record["train/loss"]) else progress.nonfinite_streak + 1
                    if progress.nonfinite_streak >= t.max_nonfinite_steps:
                        path = save_checkpoint(step, "non-finite loss")
                        raise NonFiniteLoss(f"{progress.nonfinite_streak} steps in a row (the last: step {step}) had no "
                                            f"finite loss; checkpoint {path}; lower train.lr, then `rollflow train "
                                            f"--resume {run_dir}`")
                    if stop.requested is not None:
                        path = save_checkpoint(step, f"stopped by {stop.requested}")
                        raise Stopped(f"stopped by {stop.requested} after step {step}; checkpoint {path}; continue "
                                      f"with `rollflow train --resume {run_dir}`")
                    if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == t.steps:
                        save_checkpoint(step, "periodic" if step < t.steps else "final")
            except (TrainerLost, WorkerGone, Stopped, NonFiniteLoss, KeyboardInterrupt):
                raise
            except Exception as e:
                if controller.between_steps and controller.trained > 0:
                    path = save_checkpoint(controller.trained, f"stopped by {type(e).__name__}")
                    e.add_note(f"checkpoint of step {controller.trained} written to {path}: fix the cause, then "
                               f"`rollflow train --resume {run_dir}`")
                raise
            controller.close()
            save_policy(config, spec, workers.transport.latest(newer_than=-1), run_dir / "model" / "policy.pt")
            summary = run_summary(config, progress, controller, meta["step"] if meta else None, restarts,
                                  time.perf_counter() - t_start)
            if rt.trace:
                tracer.write(run_dir / "trace.json")
            tracker.finish(summary)
    finally:
        ledger.close()
        backend.shutdown()
    return RunResult(run_dir, summary, history)


def save_policy(config: Config, spec: EnvSpec, weights: Any, path: Path) -> None:
    """The policy ``weights`` as ``{"state_dict", "config"}`` (``build_policy`` of the config rebuilds it)."""
    assert config.sim is not None
    model = build_policy(config.sim, spec, config.seed)
    model.load_state_dict(weights.tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": config.model_dump()}, path)


def run_summary(config: Config, progress: SimProgress, controller: Controller, resumed_from: int | None,
                restarts: int, wall_seconds: float) -> dict[str, Any]:
    sim = config.sim
    assert sim is not None
    first, final = progress.evals[0] if progress.evals else {}, progress.evals[-1] if progress.evals else {}
    after_bc = next((e for e in progress.evals if e.get("label") == "after BC"), {})
    first_step = resumed_from or 0
    pipeline = controller.pipeline_summary() if config.train.steps > first_step else {}
    return {
        "env": sim.env,
        "algorithm": sim.algorithm,
        "eval_return_initial": first.get("eval/return_mean"),
        "eval_return_final": final.get("eval/return_mean"),
        "eval_success_initial": first.get("eval/success"),
        "eval_success_final": final.get("eval/success"),
        "eval_success_after_bc": after_bc.get("eval/success"),
        **{f"eval_{name}_success_{when}": e.get(f"eval/{name}/success") for name in sim.eval_sets
           for when, e in (("after_bc", after_bc), ("final", final))},
        "bc_seconds": progress.bc_seconds,
        "train_return_recent": sum(progress.recent) / len(progress.recent) if progress.recent else None,
        "target_return": sim.target_return,
        "seconds_to_target": progress.reached_target,
        "env_steps": progress.env_steps,
        "train_seconds": progress.train_seconds,
        "env_steps_per_second": progress.env_steps / progress.train_seconds if progress.train_seconds else 0.0,
        "steps": config.train.steps,
        "backend": config.runtime.backend,
        "actors": config.runtime.rollout.workers,
        "staleness": staleness(config),
        "resumed_from_step": resumed_from,
        "restarts": restarts,
        "wall_seconds": wall_seconds,
        "infra_retries": controller.infra_retries,
        "faults": dict(controller.faults),
        "dropped_groups": controller.dropped_groups,
        **pipeline,
    }


def _write_checkpoint(workers: SimWorkers, controller: Controller, tracker: Tracker, ledger: Ledger,
                      progress: SimProgress, step: int, why: str, folder: Path) -> dict[str, Any]:
    version = workers.trainer.save_state(str(folder / "trainer.pt"))
    torch.save({"controller": controller.snapshot(), "actor_rng": workers.actors.rng_state(), "progress": progress,
                "python_rng": random.getstate(), "torch_rng": torch.get_rng_state()}, folder / "state.pt")
    metrics_bytes, rollouts_bytes = tracker.sizes()
    return {"version": version, "why": why, "ledger_bytes": ledger.size(), "metrics_bytes": metrics_bytes,
            "rollouts_bytes": rollouts_bytes, "completed": step}
