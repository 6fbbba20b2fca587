"""The run configuration: one small pydantic model per component, every field documented.

Batch sizes have one meaning each, defined here and nowhere else:

- ``rollout.groups_per_step`` (G): groups, i.e. distinct task instances (prompts), per RL step.
- ``rollout.group_size`` (n): samples per task instance (responses per prompt), the group GRPO normalises over.
- ``Config.samples_per_step`` = G × n: samples the trainer consumes per step (derived, not settable).
- ``train.minibatches_per_step``: optimizer updates each epoch cuts the step's samples into.
- ``train.epochs_per_step``: passes over the step's samples, so one step makes minibatches × epochs updates.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rollflow.algos import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    path: str | None = None
    """Local Hugging Face checkpoint folder (model + tokenizer). Unset: the built-in tiny Qwen2 model."""
    hidden_size: int = Field(128, ge=8)
    """Built-in model: width of the residual stream."""
    layers: int = Field(4, ge=1)
    """Built-in model: number of transformer blocks."""
    heads: int = Field(4, ge=1)
    """Built-in model: attention heads (hidden_size must be divisible by it)."""
    intermediate_size: int = Field(512, ge=8)
    """Built-in model: width of the MLP."""
    max_positions: int = Field(64, ge=8)
    """Built-in model: longest prompt + response it can read."""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be divisible by model.heads={self.heads}")
        return self


class AdditionTaskConfig(Section):
    name: Literal["addition"] = "addition"
    """Multi-digit addition, operands zero-padded, answer written units digit first."""
    min_digits: int = Field(1, ge=1, le=9)
    """Fewest digits an operand has."""
    max_digits: int = Field(3, ge=1, le=9)
    """Most digits an operand has (also the padded width)."""
    partial_credit: float = Field(0.5, ge=0.0, le=1.0)
    """Reward scale for the fraction of right digits of a wrong answer (exact answers score 1)."""
    demo_carry_drop: float = Field(0.5, ge=0.0, le=1.0)
    """Chance the SFT demonstrator forgets a carry (0: exact references); the verifier always checks the true sum."""
    eval_size: int = Field(500, ge=1)
    """Held-out problems, disjoint from training."""

    @model_validator(mode="after")
    def _ordered(self) -> AdditionTaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"task.min_digits={self.min_digits} is more than task.max_digits={self.max_digits}")
        return self


class SortingTaskConfig(Section):
    name: Literal["sorting"] = "sorting"
    """Sort a string of digits."""
    min_len: int = Field(3, ge=1)
    """Shortest input."""
    max_len: int = Field(6, ge=1)
    """Longest input."""
    partial_credit: float = Field(0.5, ge=0.0, le=1.0)
    """Reward scale for the fraction of right positions of a wrong answer."""
    eval_size: int = Field(500, ge=1)
    """Held-out problems, disjoint from training."""

    @model_validator(mode="after")
    def _ordered(self) -> SortingTaskConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"task.min_len={self.min_len} is more than task.max_len={self.max_len}")
        return self


class FileTaskConfig(Section):
    name: Literal["file"] = "file"
    """Problems from your JSONL / Parquet file."""
    path: str
    """The data file, one problem per row."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    answer_column: str = "answer"
    """Column holding the answer (the SFT target and the reward fn's reference)."""
    eval_path: str | None = None
    """Optional held-out file; unset: a seeded eval_fraction of the rows is held out."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of rows held out when eval_path is unset."""
    reward_fn: str | None = None
    """'package.module:function' or 'path/file.py:function'; unset: exact match with the answer."""


class GuessTaskConfig(Section):
    name: Literal["guess"] = "guess"
    """Multi-turn agent task: look two hidden digits up with the get('x') tool, answer their sum."""
    letters: int = Field(12, ge=2, le=26)
    """Letters a, b, … hiding a digit each (a new table per problem)."""
    lazy_letters: int = Field(4, ge=0)
    """The last this-many letters are the ones the SFT demonstrator may skip looking up."""
    demo_skip: float = Field(0.6, ge=0.0, le=1.0)
    """Chance the demonstrator skips looking up a lazy second letter and guesses (the gap RL has to close)."""
    eval_size: int = Field(200, ge=1)
    """Held-out problems, over eval_pairs letter pairs (each with new tables)."""
    eval_pairs: int = Field(40, ge=1)
    """Letter pairs held out: training never asks for them."""


class ProgramTaskConfig(Section):
    name: Literal["program"] = "program"
    """Agent task: write a Python program printing the answer; run in the code sandbox, partial credit by stages."""
    min_len: int = Field(2, ge=1)
    """Shortest list a problem gives."""
    max_len: int = Field(4, ge=1)
    """Longest list a problem gives."""
    buggy_ops: list[Literal["sum", "max", "min", "len", "sort", "rev"]] = ["max", "sort", "rev"]
    """Operations the SFT demonstrator writes a bug for (with probability demo_bug): the gap RL has to close."""
    demo_bug: float = Field(0.6, ge=0.0, le=1.0)
    """Chance the demonstrator writes its bug on a buggy operation."""
    fail_penalty: float = -1.0
    """Reward of a program that failed, before stage credit. The paper's -10 (PartialCredit's default) dwarfs the task
    score here: with GRPO's per-group normalisation one crash in a group flattens the right-vs-wrong signal of the
    rest, and the policy drifted to programs that never crash but print the wrong thing (seed 1: 0.47 -> 0.83 ->
    0.53). -1 keeps a crash worse than a wrong answer on the task score's scale."""
    stage_credit: float = Field(0.1, ge=0.0)
    """Reward per stage a failed program reached (data, printed)."""
    timeout_s: float = Field(5.0, gt=0.0)
    """Wall-clock seconds a program may run in the sandbox (status timeout past it)."""
    memory_mb: int = Field(256, ge=16)
    """Address space a program may use, MiB."""
    isolation: Literal["auto", "bwrap", "namespaces", "rlimits"] = "auto"
    """Sandbox isolation tier: auto takes the strongest that works here (`rollflow sandbox run` reports it)."""
    eval_size: int = Field(200, ge=1)
    """Held-out problems, disjoint from training."""
    instrumenter: str = "rules"
    """What inserts the stage markers before a program runs: 'rules' (regular expressions per stage), or the path of a
    local Hugging Face checkpoint of a frozen causal LM, asked per program and kept only when it added nothing but
    markers (otherwise the rules); reward/instrumented_by_model is the share it was kept."""
    instrumenter_max_new_tokens: int = Field(256, ge=1)
    """Most tokens the instrumenting model writes per program (a longer answer is cut and falls back to the rules)."""

    @model_validator(mode="after")
    def _ordered(self) -> ProgramTaskConfig:
        if self.min_len > self.max_len:
            raise ValueError(f"task.min_len={self.min_len} is more than task.max_len={self.max_len}")
        return self

    @field_validator("instrumenter")
    @classmethod
    def _checkpoint(cls, value: str) -> str:
        if value == "rules":
            return value
        if not (Path(value) / "config.json").is_file():
            raise ValueError(f"task.instrumenter={value!r} is neither 'rules' nor a Hugging Face checkpoint directory "
                             "(no config.json there); give 'rules' or a folder written by save_pretrained")
        return str(Path(value).resolve())  # reward workers may run in another working directory


TaskConfig = Annotated[AdditionTaskConfig | SortingTaskConfig | FileTaskConfig | GuessTaskConfig | ProgramTaskConfig,
                       Field(discriminator="name")]


class SFTConfig(Section):
    steps: int = Field(800, ge=0)
    """Supervised warm-start steps on reference solutions before RL (0 skips SFT)."""
    batch_size: int = Field(128, ge=1)
    """Reference solutions per SFT step (128 crosses the learning transition reliably across seeds; 64 did not)."""
    lr: float = Field(1e-3, gt=0.0)
    """SFT peak learning rate, decayed linearly to 0."""
    torch_threads: int = Field(2, ge=1)
    """Trainer threads during SFT, when nothing else runs (RL uses runtime.trainer.torch_threads)."""


RENAMED = {"prompts_per_step": "groups_per_step", "samples_per_prompt": "group_size"}


class RolloutConfig(Section):
    groups_per_step: int = Field(32, ge=1)
    """G: groups (distinct prompts) per RL step."""
    group_size: int = Field(8, ge=2)
    """n: samples per prompt (the group GRPO normalises over)."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature (the trainer scores tokens at the same temperature)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest response; a response cut here has finish_reason 'length'."""
    episode_timeout: float | None = Field(None, gt=0.0)
    """Seconds an episode may take (null: no limit); past it the episode ends with status 'timeout' and is scored
    on what it produced so far."""
    engine_timeout: float | None = Field(600.0, gt=0.0)
    """Seconds one request may wait for the inference engine; past it the sample is an infra_error (retried)."""
    env_timeout: float | None = Field(None, gt=0.0)
    """Seconds one environment call may take (multi-turn workflows); past it the episode ends with status 'timeout'."""
    workflow: Literal["auto", "single_turn", "agent"] = "auto"
    """How a problem becomes a trajectory: 'single_turn' (one response, scored by the task's verifier), 'agent' (model
    turns alternating with the task's environment, rollflow.workflows.AgentLoop), 'auto' (agent if the task has one)."""
    max_turns: int = Field(4, ge=1)
    """Agent workflow: most model turns per episode (max_new_tokens bounds each turn)."""
    turn_discount: float = Field(1.0, ge=0.0, le=1.0)
    """Agent workflow: an episode's reward is the sum of its turns' rewards discounted by this per turn."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED.items():
                if old in data:
                    raise ValueError(f"rollout.{old} is now rollout.{new} (same meaning); rename it in your config")
        return data


class TrainConfig(Section):
    steps: int = Field(120, ge=0)
    """RL steps (one optimizer-version each)."""
    lr: float = Field(1e-4, gt=0.0)
    """RL learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this."""
    minibatches_per_step: int = Field(2, ge=1)
    """Optimizer updates per epoch; the step's samples are shuffled and cut into this many."""
    epochs_per_step: int = Field(1, ge=1)
    """Passes over the step's samples."""
    max_nonfinite_steps: int = Field(3, ge=1)
    """A minibatch whose loss or gradient is NaN/Inf is skipped (counted in train/nonfinite_updates); after this many
    steps in a row with no finite update the run stops, with a checkpoint of the last good step."""
    whole_groups: bool = True
    """Minibatches take whole groups (when there are at least as many groups as minibatches), so the samples of one
    prompt, whose advantages sum to zero, update together; False: samples are shuffled one by one."""


class CriticConfig(Section):
    lr: float = Field(1e-4, gt=0.0)
    """Critic learning rate (AdamW); the critic starts as a copy of the policy with a zeroed value head."""
    value_clip: float | None = Field(0.2, gt=0.0)
    """Clip each value's move from its pre-step estimate to ±this in the value loss (null: no clipping)."""


class AlgoConfig(Section):
    advantage: str = "grpo"
    """Advantage estimator (see `rollflow list algos`): grpo, rloo, reinforce_pp, or gae (which trains a critic)."""
    scale_by_std: bool = True
    """GRPO: divide by the group's reward std (False: Dr. GRPO)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount of token-level estimators (gae, reinforce_pp)."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE's λ: bias-variance trade-off of the advantage."""
    critic: CriticConfig = Field(default_factory=CriticConfig)
    """The value model, used only by estimators that need one (gae)."""
    loss: str = "ppo_clip"
    """Policy loss: ppo_clip (DAPO's clip-higher is clip_high > clip_low), gspo (sequence-level ratio), reinforce."""
    aggregation: str = "token-mean"
    """How per-token losses become one scalar."""
    loss_norm: float | None = Field(None, gt=0.0)
    """Constant normaliser of the 'seq-mean-token-sum-norm' aggregation (null: rollout.max_new_tokens)."""
    clip_low: float = Field(0.2, gt=0.0, lt=1.0)
    """Ratio clip below 1 (ppo_clip, gspo)."""
    clip_high: float = Field(0.2, gt=0.0)
    """Ratio clip above 1 (ppo_clip, gspo)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Entropy bonus weight."""
    correction: str = "tis"
    """Off-policy correction for tokens sampled by an older version: none, tis, decoupled, aipo."""
    correction_cap: float | None = Field(None, gt=0.0)
    """The correction's bound on the behaviour importance weight: the truncation cap (tis, default 2), the weight
    above which a token is dropped (decoupled, default 5), or AIPO's ρ (aipo, default 2). null: that default."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL to a frozen reference policy (the policy RL starts from); 0: no reference role at all."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (see `rollflow list algos`)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL goes: a loss term (GRPO) or a per-token penalty in the reward (PPO/RLHF style)."""
    lr_by_signal: bool = True
    """Scale each step's learning rate by the share of its samples with a non-zero advantage (a group whose rewards
    all agree has none): Adam would otherwise take a full-size step on the signal of one odd sample, which lets RL
    degrade a task the policy already solves (see docs/architecture.md, "RL on a solved task")."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop each group whose rewards are all equal (no signal) and admit a new one in its place."""
    max_dropped_per_step: int = Field(64, ge=0)
    """Dynamic sampling: most groups dropped per step; later ones are kept, so a solved task cannot stall the run."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO soft overlong penalty: responses within this many tokens of rollout.max_new_tokens lose reward linearly,
    down to -1 at the limit (0: off)."""
    duration_weighting: bool = False
    """Multiply each sample's advantages by its action's duration over the batch mean (the seconds its environment
    and reward stage spent executing the agent's actions; see algos.duration). For asynchronous runs whose actions'
    durations differ and where fast actions reach the trainer more often than the policy picks them, at a rate
    ∝ π/d (the policy shares the workers' time among actions and the trainer takes what finishes first): that
    favours fast, possibly worse actions, and the weights restore ∝ π. Leave it off where every action the policy
    starts is trained (synchronous runs, and rollflow's store, which waits for slow groups rather than drop them):
    actions already arrive ∝ π whatever their durations, so the weights would favour slow actions (∝ π·d), or only
    add variance where durations do not depend on the action."""

    @model_validator(mode="after")
    def _registered(self) -> AlgoConfig:
        names = ((ADVANTAGES, "advantage"), (POLICY_LOSSES, "loss"), (AGGREGATIONS, "aggregation"),
                 (CORRECTIONS, "correction"), (KL_ESTIMATORS, "kl_estimator"))
        for registry, field in names:
            try:
                registry.get(getattr(self, field))
            except KeyError as e:
                raise ValueError(f"algo.{field}: {e.args[0]}") from None
        return self

    @model_validator(mode="after")
    def _used(self) -> AlgoConfig:
        """Refuse a field moved from its default that the chosen parts ignore: it would silently change nothing.
        Judged against the default rather than the fields given, so that a run's config.yaml, which lists every
        field, loads again."""
        def reads(*params: str) -> Callable[[Callable[..., Any]], bool]:
            """Whether a part takes one of ``params`` and its body reads it. Some parts take a config field only so
            that every part of their kind can be called alike, and ignore it (``reinforce`` takes ``clip_low``, every
            aggregation takes ``norm``), so the signature alone cannot tell. Without source to read, a parameter
            taken counts as read."""

            def uses(fn: Callable[..., Any]) -> bool:
                taken = [p for p in params if p in inspect.signature(fn).parameters]
                try:
                    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
                except (OSError, TypeError, SyntaxError):
                    return bool(taken)
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    return bool(taken)
                return any(isinstance(n, ast.Name) and n.id in taken and isinstance(n.ctx, ast.Load)
                           for statement in node.body for n in ast.walk(statement))

            return uses

        def ratio_not_to_current(fn: Callable[..., Any]) -> bool:
            # a ratio taken to π itself is 1 in value, inside every clip range
            return getattr(fn, "proximal", None) != "current"

        # (field, the choice deciding whether it is used, that choice's registry, whether a registered part uses it)
        by_part = [
            ("scale_by_std", "advantage", ADVANTAGES, reads("scale_by_std")),
            ("gamma", "advantage", ADVANTAGES, reads("gamma")),
            ("lam", "advantage", ADVANTAGES, reads("lam")),
            ("critic", "advantage", ADVANTAGES, lambda fn: getattr(fn, "needs_critic", False)),
            ("correction_cap", "correction", CORRECTIONS, reads("cap", "rho")),
            ("loss_norm", "aggregation", AGGREGATIONS, reads("norm")),
            ("clip_low", "loss", POLICY_LOSSES, reads("clip_low")),
            ("clip_high", "loss", POLICY_LOSSES, reads("clip_high")),
            ("clip_low", "correction", CORRECTIONS, ratio_not_to_current),
            ("clip_high", "correction", CORRECTIONS, ratio_not_to_current),
        ]
        problems: dict[str, str] = {}
        for field, choice, registry, uses in by_part:
            chosen, moved = getattr(self, choice), self._moved(field)
            if not moved or uses(registry.get(chosen)):
                continue
            users = [name for name in registry.names() if uses(registry.get(name))]
            fix = f"it is used by: {', '.join(users)}); remove it or choose one of those" if users else (
                f"no registered {registry.kind} uses it); remove it")
            for key, value in moved:
                problems.setdefault(key, f"algo.{key}={value} has no effect with algo.{choice}={chosen} ({fix}")
        kl_off, sampling_off = f"algo.kl_coef={self.kl_coef}", "algo.dynamic_sampling=false"
        switches = [  # (field, whether its feature is on, the setting that has it off, the setting that turns it on)
            ("kl_estimator", self.kl_coef > 0, kl_off, "algo.kl_coef > 0"),
            ("kl_in", self.kl_coef > 0, kl_off, "algo.kl_coef > 0"),
            ("max_dropped_per_step", self.dynamic_sampling, sampling_off, "algo.dynamic_sampling=true"),
        ]
        for field, on, off_setting, on_setting in switches:
            for key, value in [] if on else self._moved(field):
                problems[key] = (f"algo.{key}={value} has no effect with {off_setting} (it is used only with "
                                 f"{on_setting}); remove it or set {on_setting}")
        if problems:
            raise ValueError("; ".join(problems.values()))
        return self

    def _moved(self, field: str) -> list[tuple[str, str]]:
        """(dotted key under algo, value as written in a config) of each setting of ``field`` away from its default;
        a sub-section gives one entry per moved field."""
        value, default = getattr(self, field), type(self).model_fields[field].get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            pairs = [(f"{field}.{k}", getattr(value, k), getattr(default, k)) for k in type(value).model_fields]
        else:
            pairs = [(field, value, default)]
        return [(key, "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                for key, v, d in pairs if v != d]


class RewardLatencyConfig(Section):
    median: float = Field(0.0, ge=0.0)
    """Median seconds each reward takes (log-normal), as running generated code would; 0 = rewards are instant."""
    sigma: float = Field(0.75, gt=0.0)
    """Log-normal shape: 0.75 puts the 99.9th percentile near 10× the median."""
    max: float = Field(2.0, gt=0.0)
    """Longest a single reward may take, in seconds."""


class EvalConfig(Section):
    every: int = Field(20, ge=0)
    """Greedy held-out accuracy every this many RL steps (0: only at start, after SFT and at the end)."""
    max_new_tokens: int = Field(8, ge=1)
    """Longest greedy answer."""
    keep_best: bool = True
    """Save as run_dir/model the weights of the best held-out evaluation (initial, after SFT, every eval.every
    steps, final; a tie keeps the earlier), as Hugging Face's load_best_model_at_end; False: the final weights."""


class CheckpointConfig(Section):
    every: int = Field(20, ge=0)
    """Checkpoint every this many RL steps (0: only after SFT, at the end, and when the run is stopped); resume with
    `rollflow train --resume RUN_DIR`."""
    keep: int = Field(2, ge=1)
    """Newest checkpoints kept in run_dir/checkpoints (older ones are deleted once a newer one is whole)."""
    sft_every: int = Field(200, ge=0)
    """During SFT, checkpoint every this many SFT steps (also before its first; 0: not during SFT)."""


class RoleConfig(Section):
    workers: int = Field(1, ge=1)
    """Workers of this role (the trainer has exactly one)."""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs Ray reserves for each worker (scheduling only; 0 for workers that mostly wait)."""
    torch_threads: int | None = Field(None, ge=1)
    """torch.set_num_threads in each worker's process. null: every core while stages take turns (η = 0), an even
    share of the cores between rollout and trainer while they overlap (η > 0); the threads of roles that run at
    once should not exceed the cores."""


class RolloutRoleConfig(RoleConfig):
    concurrency: int = Field(64, ge=1)
    """Calls in flight per rollout worker: their episodes run at once and the engine batches their requests."""
    groups_per_call: int = Field(8, ge=1)
    """Most groups per rollout call; a call's groups enter the store when its last episode finishes. Single-turn
    episodes batched together finish together anyway, and fewer calls cost less; 1 suits workflows whose episodes
    take variable time (each group enters the store as soon as it is done)."""
    gather_s: float = Field(0.002, ge=0.0)
    """An engine batch starts once no new request arrived for this long (at most 50 ms after its first request):
    requests sent together, e.g. a step's groups, then share one batch. 0: start at once."""
    continuous_batching: bool | None = None
    """Batch text requests at every decoding step (a request joins the running batch, continuous batching) rather than
    in whole batches. null: on with Ray; off with the inline backend, whose runs stay exactly reproducible (which step
    a request joins at depends on timing, and with it the sampling RNG's draws)."""


class RewardRoleConfig(RoleConfig):
    num_cpus: float = Field(0.0, ge=0.0)
    """CPUs Ray reserves for each reward worker (0: rule-based rewards and sandboxes mostly wait)."""
    torch_threads: int | None = Field(1, ge=1)
    """torch.set_num_threads in each reward worker's process."""
    concurrency: int = Field(64, ge=1)
    """Samples each reward worker scores at once (threads): slow rewards, e.g. running code, overlap."""
    groups_per_call: int = Field(8, ge=1)
    """Groups per reward call: 1 lets every group finish on its own (best when rewards are slow and variable);
    more saves per-call overhead when rewards are instant."""
    timeout: float | None = Field(60.0, gt=0.0)
    """Seconds one sample's reward may take; past it the sample's reward is an infra_error: scored again on the same
    generation, up to runtime.max_retries, then masked and counted. null: wait forever."""


class RuntimeConfig(Section):
    backend: Literal["inline", "ray"] = "ray"
    """Where workers run: 'ray' = one Ray actor per worker; 'inline' = all in this process, one call at a time
    (deterministic; for debugging and unit tests)."""
    address: str | None = None
    """Ray cluster to join: null starts a private local Ray; 'auto' or 'host:port' joins one started with `ray start`."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs a private local Ray is started with (null: all of this machine's)."""
    placement: Literal["separate", "colocated"] = "separate"
    """'separate': each worker reserves its own role's CPUs; 'colocated': rollout and trainer workers share one pool
    (one node, the larger role's CPUs) and take turns on it."""
    staleness: int | Literal["auto"] = "auto"
    """η: the most versions the trainer may be ahead of any token it trains on (0 = synchronous). 'auto': start
    synchronous, measure generation, scoring and training over the first runtime.auto_steps steps, then keep η = 0,
    move to the η the measured costs and cores favour, or (when the prediction is unclear) try η = 1 for as many
    steps and keep it only if it is 10 % faster (staler samples learn less); the choice is logged with its reason (see docs/architecture.md)."""
    auto_steps: int = Field(3, ge=1)
    """Steps measured before staleness=auto settles η."""
    torch_threads: int = Field(2, ge=1)
    """torch.set_num_threads for the driver process (and, with the inline backend, every worker)."""
    rollout: RolloutRoleConfig = Field(default_factory=RolloutRoleConfig)
    """Rollout workers: each group's episodes go to the least loaded."""
    reward: RewardRoleConfig = Field(default_factory=RewardRoleConfig)
    """Reward workers: each group's scoring goes to the least loaded."""
    trainer: RoleConfig = Field(default_factory=RoleConfig)
    """The trainer (one worker); with a critic (algo.advantage=gae) the critic trains in the same worker."""
    reference: RoleConfig = Field(default_factory=lambda: RoleConfig(num_cpus=0.0, torch_threads=1))
    """Reference workers (only when algo.kl_coef > 0): score each generated group with the frozen reference policy,
    side by side with the reward workers."""
    generate_batch: int = Field(256, ge=1)
    """Most requests in one engine batch (the rest wait for the next): smaller batches pick up new weights and start
    rewards sooner, larger ones use the engine better."""
    max_generate_batch: int = Field(512, ge=1)
    """Most sequences one engine forward pass holds (an engine batch larger than this is cut)."""
    max_retries: int = Field(2, ge=0)
    """Retries of a sample hit by an infrastructure fault (a worker died, a sandbox failed) before it is masked."""
    max_restarts: int = Field(3, ge=0)
    """Times a run whose trainer died goes back to its last checkpoint on its own before it gives up."""
    call_timeout: float | None = Field(600.0, gt=0.0)
    """Seconds a call to a worker may run before the worker counts as hung: on Ray it is killed and replaced (its
    rows are produced again); null: never."""
    trace: bool = True
    """Write trace.json (Chrome/Perfetto format): one track per worker, spans for every call and wait."""

    @model_validator(mode="after")
    def _one_trainer(self) -> RuntimeConfig:
        if self.trainer.workers != 1:
            raise ValueError("runtime.trainer.workers: the trainer is one worker; set it to 1")
        return self


class SimConfig(Section):
    """The simulator recipe (``rollflow train configs/sim/cartpole.yaml``): actor workers step Gymnasium environments,
    the trainer runs PPO, APPO (V-trace) or REINFORCE on their fragments. With this section set, ``task``, ``model``,
    ``sft``, ``algo`` and ``reward_latency`` are not used; ``train.*`` (steps, lr, grad_clip, minibatches, epochs),
    ``eval.every``, ``checkpoint.*`` and ``runtime.*`` are (``runtime.rollout.workers``: actor workers)."""

    env: str = "CartPole-v1"
    """A registered Gymnasium id (MiniGrid-… ids import minigrid first) or an entry point: 'module:Class' or
    'path/file.py:Class' (a class or function returning a gymnasium.Env). Discrete actions; Box observations, or a
    dict with an 'image' entry (MiniGrid), which is used alone."""
    env_kwargs: dict[str, Any] = {}
    """Keyword arguments for the environment's constructor (gymnasium.make's for an id)."""
    frame_stack: int = Field(1, ge=1)
    """Observations stacked per step (oldest first); 1: none."""
    step_cost: float = Field(0.0, ge=0.0)
    """Seconds of computation added to every training step of the environment (a stand-in for a costly
    simulator, for throughput studies); 0: none."""
    algorithm: Literal["ppo", "appo", "pg"] = "ppo"
    """ppo: GAE and the clipped surrogate; appo: V-trace targets under the clip, for stale fragments; pg: REINFORCE
    with a normalised-return baseline."""
    envs_per_actor: int = Field(8, ge=1)
    """Environments one actor call steps in lockstep (one batched policy request per step): fragments per call."""
    fragment_steps: int = Field(128, ge=1)
    """Steps per fragment; episodes run on across fragments."""
    calls_per_step: int = Field(1, ge=1)
    """Actor calls whose fragments make one train step: env steps per train step = envs_per_actor × fragment_steps ×
    calls_per_step."""
    inference: Literal["actor", "policy_workers"] = "actor"
    """Where actions are computed: in each actor (a copy of the policy per actor; cheap environments) or in separate
    policy workers that batch the requests of every actor (costly environments; actors then only step them)."""
    policy_workers: int = Field(1, ge=1)
    """Policy workers, with inference=policy_workers (actor i asks worker i mod policy_workers)."""
    policy: str = "auto"
    """The actor-critic: auto (a CNN for image observations, integer (H, W, C), else an MLP), mlp, cnn, or a model
    of your own as 'module:Class' / 'path/file.py:Class', built as Class(observation_shape, actions, seed=,
    **policy_kwargs) (normalize_rewards=True also passed when set): a torch module whose forward(obs (B, *shape))
    gives action logits (B, actions) and value(obs) values (B,); e.g. rollflow.envs.world_policy:CrossViewPolicy."""
    policy_kwargs: dict[str, Any] = {}
    """Keyword arguments for a policy given as 'module:Class'."""
    hidden: list[Annotated[int, Field(ge=1)]] = [64, 64]
    """MLP: units per hidden layer (separate actor and critic trunks). CNN: the last entry is the shared layer."""
    channels: list[Annotated[int, Field(ge=1)]] = [16, 32]
    """CNN: output channels of each 2×2 convolution."""
    normalize_observations: bool = False
    """MLP: standardise observations by running mean and std (kept in the weights, updated after each step)."""
    normalize_rewards: bool = False
    """Divide rewards by the running std of discounted returns (ppo, appo)."""
    gamma: float = Field(0.99, ge=0.0, le=1.0)
    """Discount."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ (ppo)."""
    clip: float = Field(0.2, gt=0.0, lt=1.0)
    """PPO's ratio clip ε (ppo, appo)."""
    value_clip: float | None = Field(0.2, gt=0.0)
    """Clip of the value update around the old estimate (ppo, appo); null: none."""
    value_coef: float = Field(0.5, ge=0.0)
    """Weight of the value loss."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus."""
    normalize_advantages: bool = True
    """Standardise advantages per minibatch (ppo, appo)."""
    rho_bar: float = Field(1.0, gt=0.0)
    """V-trace's clip of the importance ratio in the targets and advantages (appo)."""
    c_bar: float = Field(1.0, gt=0.0)
    """V-trace's clip of the traces (appo)."""
    demonstrator: str | None = None
    """'module:function' returning the action a scripted expert takes in an environment (given the unwrapped
    environment), e.g. rollflow.envs.worlds:planner_action; needed by bc_steps."""
    bc_steps: int = Field(0, ge=0)
    """Behaviour-cloning updates on the demonstrator's actions before RL (0: none)."""
    bc_episodes: int = Field(2000, ge=1)
    """Demonstrated episodes collected for behaviour cloning (training environments)."""
    bc_batch: int = Field(256, ge=1)
    """Demonstrated steps per behaviour-cloning update."""
    bc_lr: float = Field(1e-3, gt=0.0)
    """Learning rate of behaviour cloning."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of KL(π ‖ π_BC) to the behaviour-cloned policy during RL (ppo, appo; needs bc_steps)."""
    kl_decay_steps: int = Field(0, ge=0)
    """The KL weight falls linearly to 0 over this many RL steps (0: constant)."""
    anneal_lr: bool = True
    """Decay train.lr linearly to 0 over train.steps."""
    step_timeout: float | None = Field(None, gt=0.0)
    """Seconds one lockstep step of an actor call's environments may take; past it the environment being stepped is
    declared hung, dropped with its partial fragment (counted, retried elsewhere) and replaced. null: no limit, and
    environments step on the actor's event loop (fastest); a hang then stalls that actor until runtime.call_timeout
    replaces it."""
    target_return: float | None = None
    """A return to report the training time to (the mean of the last 20 finished training episodes reaching it), and
    the return a held-out episode must reach to count as a success; null: success is a positive return."""
    eval_episodes: int = Field(20, ge=1)
    """Held-out episodes per evaluation and per set (eval.every steps, at the start, after BC and at the end)."""
    eval_greedy: bool = True
    """Held-out episodes take the most likely action; false: they sample from the policy (a seeded generator), which
    a greedy policy stuck in a loop (MiniGrid) may need to show what it learned."""
    eval_env_kwargs: dict[str, Any] = {}
    """Merged over env_kwargs for the held-out episodes only (e.g. {split: unseen}: worlds never trained on)."""
    eval_sets: dict[str, dict[str, Any]] = {}
    """More held-out sets, by name: environment kwargs merged over env_kwargs (not over eval_env_kwargs), evaluated
    beside the held-out environments and reported as eval/<name>/success (e.g. {train: {split: train}}: success in
    the training worlds, on seeds no training environment used)."""
    eval_seed: int = Field(1_000_000_000, ge=0)
    """First environment seed of the held-out episodes; training environments use seeds below it."""


# Keys a resumed run may change (``rollflow train --resume RUN_DIR key=value``): how long, where and how fast it runs,
# not what it learns. Any other difference from the run's config.yaml is refused, naming the keys.
RESUMABLE = ("run_dir", "progress", "train.steps", "eval.", "checkpoint.", "runtime.")


class Config(Section):
    seed: int = 0
    """Seeds the model init, the problem stream and sampling."""
    run_dir: str = "runs/default"
    """Where the run writes its config, metrics, rollouts, plots and model."""
    progress: bool = True
    """Show a live progress bar."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=AdditionTaskConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    reward_latency: RewardLatencyConfig = Field(default_factory=RewardLatencyConfig)
    """Simulated reward duration (training rewards only), for studying slow verifiers."""
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sim: SimConfig | None = None
    """Set: the run is the simulator recipe (actors stepping Gymnasium environments), not the language-model one."""

    @property
    def samples_per_step(self) -> int:
        """G × n: samples the trainer consumes per RL step."""
        return self.rollout.groups_per_step * self.rollout.group_size

    def resume_differences(self, saved: Config) -> dict[str, tuple[Any, Any]]:
        """Dotted keys whose values differ from ``saved`` and may not change on resume → (saved value, this one)."""
        mine, theirs = _flatten(self.model_dump()), _flatten(saved.model_dump())
        return {k: (theirs.get(k), mine.get(k)) for k in sorted(mine.keys() | theirs.keys())
                if mine.get(k) != theirs.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)}

    @model_validator(mode="after")
    def _overlong(self) -> Config:
        if self.algo.overlong_buffer > self.rollout.max_new_tokens:
            raise ValueError(f"algo.overlong_buffer={self.algo.overlong_buffer} exceeds rollout.max_new_tokens="
                             f"{self.rollout.max_new_tokens}; the penalty zone must fit inside the response length")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.sim is not None:
            if self.sim.policy not in ("auto", "mlp", "cnn") and ":" not in self.sim.policy:
                raise ValueError(f"sim.policy={self.sim.policy!r}: give auto, mlp, cnn or a class of your own as "
                                 f"'module:Class' / 'path/file.py:Class'")
            bad = [n for n in self.sim.eval_sets if not n.replace("_", "").isalnum()]
            if bad:
                raise ValueError(f"sim.eval_sets names {bad} must be letters, digits and _ (they name metrics)")
            if self.sim.policy_kwargs and ":" not in self.sim.policy:
                raise ValueError("sim.policy_kwargs are for a policy given as 'module:Class'; use sim.hidden and "
                                 "sim.channels for mlp and cnn")
            steps = self.sim.envs_per_actor * self.sim.fragment_steps * self.sim.calls_per_step
            if self.train.minibatches_per_step > steps:
                raise ValueError(f"train.minibatches_per_step={self.train.minibatches_per_step} exceeds the env steps "
                                 f"per train step ({steps} = sim.envs_per_actor × sim.fragment_steps × "
                                 f"sim.calls_per_step)")
            if self.sim.bc_steps and self.sim.demonstrator is None:
                raise ValueError("sim.bc_steps needs sim.demonstrator ('module:function' giving the expert's action)")
            if self.sim.kl_coef > 0 and not self.sim.bc_steps:
                raise ValueError("sim.kl_coef is a KL term to the behaviour-cloned policy: it needs sim.bc_steps > 0")
            if self.sim.kl_coef > 0 and self.sim.algorithm == "pg":
                raise ValueError("sim.kl_coef is applied by ppo and appo; sim.algorithm=pg has none")
            if self.sim.eval_seed < (self.seed + 1) * 1_000_000:
                raise ValueError(f"sim.eval_seed={self.sim.eval_seed} overlaps the training environments' seeds "
                                 f"(seed·10⁶ + actor·10⁴ + k, up to {(self.seed + 1) * 1_000_000}); raise it")
            return self
        if self.train.minibatches_per_step > self.samples_per_step:
            raise ValueError(
                f"train.minibatches_per_step={self.train.minibatches_per_step} exceeds samples per step "
                f"({self.samples_per_step} = rollout.groups_per_step × rollout.group_size)"
            )
        return self


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
