"""The streaming controller, driven through the inline backend (deterministic: every call runs as it is submitted)
with fake rollout / reward / trainer workers on GRPO's stage table, and the real ``TrainerWorker`` where masking is
what is tested."""

import itertools
import json
import time

import pytest
import torch

from rollflow.algos import ADVANTAGES, policy_loss_fn
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import Column, Problem, RewardCell, RewardResult, Status, Trajectory, TrajectoryCell
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.backend import InlineBackend, WorkerLost
from rollflow.runtime.controller import Controller, StepResult, union_seconds
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import TrainerWorker, TrainResult
from rollflow.runtime.stage import Produced, Stage, StageOutput
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.testing import ScriptedBackend

P, N = 2, 3  # groups per step, samples per group
B = P * N  # samples per step
TASK, TRAJECTORY, REWARD = "task", "trajectory", "reward"
COLUMNS = [Column(TASK), Column(TRAJECTORY, (TASK,), versioned=True), Column(REWARD, (TRAJECTORY,))]


class Policy:
    """The trainer's current version, shared by the fakes: the fake trainer bumps it, fake rollouts sample at it
    (as a real rollout worker that picks up every published version before each engine batch would)."""

    def __init__(self, version: int = 0) -> None:
        self.version = version


class FakeRollout:
    """Answers every prompt with the uid's last digit (as text and ids) then EOS, at ``policy.version``.

    ``errors`` are raised by the next calls, one per call, before anything is generated. ``calls`` records the uids
    of every call (failed ones too), ``generated`` the uids actually answered."""

    def __init__(self, tokenizer, policy: Policy, errors: list[Exception] | None = None) -> None:
        self.tokenizer, self.policy = tokenizer, policy
        self.errors = list(errors or [])
        self.calls: list[list[int]] = []
        self.generated: list[int] = []

    def rollout(self, items: list[tuple[int, Problem]]) -> StageOutput:
        self.calls.append([uid for uid, _ in items])
        if self.errors:
            raise self.errors.pop(0)
        started, version, out = time.time(), self.policy.version, []
        for uid, problem in items:
            self.generated.append(uid)
            prompt = [self.tokenizer.bos_token_id, *self.tokenizer.encode(problem.prompt, add_special_tokens=False)]
            ids = [*self.tokenizer.encode(str(uid % 10), add_special_tokens=False), self.tokenizer.eos_token_id]
            trajectory = Trajectory(prompt + ids, [0] * len(prompt) + [1] * len(ids), [0.0] * len(prompt) + [-0.5] * len(ids),
                                    [-1] * len(prompt) + [version] * len(ids), [], str(uid % 10))
            out.append(Produced(uid, TrajectoryCell.of(trajectory), started, time.time()))
        return StageOutput(out)


class FakeReward:
    """Reward 1 when the response's digit is even; ``infra_error`` for ``flaky`` uids (``times`` times each).
    ``errors`` are raised by the next calls, one per call."""

    def __init__(self, flaky=frozenset(), times: int = 1, errors: list[Exception] | None = None) -> None:
        self.failures_left = {uid: times for uid in flaky}
        self.errors = list(errors or [])
        self.calls: list[list[int]] = []

    def score(self, items: list[tuple[int, Problem, TrajectoryCell]]) -> StageOutput:
        self.calls.append([uid for uid, _, _ in items])
        if self.errors:
            raise self.errors.pop(0)
        out, now = [], time.time()
        for uid, _, cell in items:
            if self.failures_left.get(uid, 0) > 0:
                self.failures_left[uid] -= 1
                result = RewardResult(0.0, status=Status.INFRA_ERROR)
            else:
                result = RewardResult(float(int(cell.text) % 2 == 0))
            out.append(Produced(uid, RewardCell(result, 0.0), now, time.time()))
        return StageOutput(out)


class FakeTrainer:
    """Records every batch with the version it was trained at, bumps ``policy.version``; publishes nothing.
    ``seconds``: how long a step takes (busy wait, so the step's span is never empty)."""

    def __init__(self, policy: Policy, seconds: float = 0.0) -> None:
        self.policy, self.seconds = policy, seconds
        self.steps: list[tuple[int, list[list]]] = []  # (version trained at, groups)

    def train(self, groups) -> TrainResult:
        started = time.time()
        self.steps.append((self.policy.version, groups))
        while time.time() - started < self.seconds:
            pass
        self.policy.version += 1
        publish_started = time.time()
        return TrainResult({"loss": 0.0}, self.policy.version, started, time.time(), publish_started)


def problems():
    for i in itertools.count():
        yield Problem(f"{i % 10}+{i % 7}=", str(i % 10 + i % 7))


def make_controller(tokenizer, reward=None, trainer=None, eta=0, max_retries=2, rollout_workers=1,
                    generate_batch=B, rollout_errors=None, policy=None, backend=None, rollout_calls=1):
    policy = policy or Policy()
    backend = backend or InlineBackend()
    rollouts = [FakeRollout(tokenizer, policy, (rollout_errors or {}).get(i)) for i in range(rollout_workers)]
    reward = reward or FakeReward()
    trainer = trainer or FakeTrainer(policy)
    stages = [
        Stage(TRAJECTORY, WorkerGroup("rollout", rollouts, backend), "rollout", lambda uid, cells: (uid, cells[TASK]),
              groups_per_call=max(1, generate_batch // N), calls_per_worker=rollout_calls),
        Stage(REWARD, WorkerGroup("reward", [reward], backend), "score",
              lambda uid, cells: (uid, cells[TASK], cells[TRAJECTORY]), calls_per_worker=64),
    ]
    controller = Controller(
        SampleStore(COLUMNS), StalenessBudget(eta, B), stages, WorkerGroup("trainer", [trainer], backend), problems(),
        group_size=N, groups_per_step=P, version=policy.version, max_retries=max_retries,
    )
    return controller, rollouts, reward, trainer


def trained_rows(results: list[StepResult]) -> dict[int, object]:
    return {r.uid: r for res in results for g in res.groups for r in g}


# -- the loop ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0, 2])
def test_run_trains_exactly_steps_steps_on_whole_groups(tokenizer, eta):
    steps = 4
    controller, [rollout], _, trainer = make_controller(tokenizer, eta=eta)
    results = list(controller.run(steps))

    assert [r.step for r in results] == [1, 2, 3, 4]
    assert [r.train.version for r in results] == [1, 2, 3, 4]
    assert len(trainer.steps) == steps
    for res, (_, groups) in zip(results, trainer.steps):
        assert res.groups is groups  # the yielded groups are the ones trained on
        assert len(groups) == P and all(len(g) == N for g in groups)
        assert all(len({r.group_id for r in g}) == 1 for g in groups)  # whole groups, never mixed
        assert all(r[REWARD].result.reward == float(int(r[TRAJECTORY].text) % 2 == 0) for g in groups for r in g)
        assert {"store/admitted", "queue/trainer_wait_s"} <= set(res.metrics)
    uids = [r.uid for res in results for g in res.groups for r in g]
    assert len(uids) == len(set(uids)) == steps * B  # none consumed twice, none lost
    assert sorted(uids) == list(range(steps * B))
    assert controller.budget.admitted == steps * B  # exactly steps batches admitted, never more
    assert sorted(rollout.generated) == list(range(steps * B))  # nothing generated that was not trained
    assert controller.store.counts() == {"in_flight": 0, "ready": 0, "consumed": steps * B, "dropped": 0}
    assert controller.version == steps and controller.infra_retries == 0


def test_rows_carry_prompt_response_and_reward(tokenizer):
    controller, *_ = make_controller(tokenizer)
    [result] = controller.run(1)
    assert [[r.uid for r in g] for g in result.groups] == [[0, 1, 2], [3, 4, 5]]
    assert [g[0].group_id for g in result.groups] == [0, 1]
    assert [g[0][TASK].prompt for g in result.groups] == ["0+0=", "1+1="]
    rows = trained_rows([result])
    assert [rows[u][TRAJECTORY].text for u in range(B)] == ["0", "1", "2", "3", "4", "5"]
    assert [rows[u][REWARD].result.reward for u in range(B)] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert isinstance(rows[0][TRAJECTORY].payload, Trajectory)  # inline: the payload is the trajectory itself
    assert {"admitted", "started", TRAJECTORY, REWARD, "finished", "consumed"} <= set(rows[0].timestamps)


# -- staleness ---------------------------------------------------------------------------------------------------------
def lags(trainer: FakeTrainer) -> list[int]:
    return [v - r[TRAJECTORY].version for v, groups in trainer.steps for g in groups for r in g]


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_admission_respects_the_staleness_budget(tokenizer, eta):
    steps = 6
    controller, *_ = make_controller(tokenizer, eta=eta, generate_batch=4 * B)
    admitted, trained = [], []
    for r in controller.run(steps):
        admitted.append(r.metrics["store/admitted"])
        trained.append(sum(len(g) for g in r.groups))
    # Once step s is trained (the version is now s) the next batch is admitted at once, up to (s + η + 1)·B samples
    # in all: η = 0 admits a batch only once the previous one is trained; never more than steps·B in all.
    assert admitted == [min(s + eta + 1, steps) * B for s in range(1, steps + 1)]
    assert trained == [B] * steps


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_no_trained_row_is_more_than_eta_versions_stale(tokenizer, eta):
    controller, _, _, trainer = make_controller(tokenizer, eta=eta, generate_batch=4 * B)
    results = list(controller.run(6))
    assert len(results) == 6
    observed = lags(trainer)
    assert len(observed) == 6 * B
    assert min(observed) >= 0 and max(observed) <= eta
    # The budget is used: rows generated ahead of the trainer are up to eta versions old when trained.
    assert max(observed) == eta


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
@pytest.mark.parametrize("flaky", [{0}, {1, 4}, {3, 4, 5, 6}, {0, 7, 13, 20}])
def test_due_rule_keeps_lag_within_eta_when_groups_complete_out_of_order(tokenizer, eta, flaky):
    # An infra_error sends a row back to be generated again, so its group completes after younger groups.
    reward = FakeReward(flaky=flaky, times=1)
    controller, _, _, trainer = make_controller(tokenizer, reward, eta=eta, generate_batch=4 * B)
    results = list(controller.run(5))
    assert len(results) == 5
    assert controller.infra_retries == len(flaky)
    assert max(lags(trainer)) <= eta
    assert all(r.status is Status.OK for r in trained_rows(results).values())
    order = [g[0].group_id for _, groups in trainer.steps for g in groups]
    assert sorted(order) == list(range(5 * P))
    if eta > 0:
        assert order != sorted(order)  # younger groups did overtake the delayed one: the rule was exercised


def test_late_group_is_trained_the_step_it_falls_due(tokenizer):
    # η = 1: group 0 (uid 0 fails once) completes after groups 1 and 2, which go first at version 0. At version 1
    # group 0 is due (admitted at 0, 0 + η <= 1) and goes ahead of the complete groups 3, 4 and 5 ...
    controller, _, _, trainer = make_controller(tokenizer, FakeReward(flaky={0}), eta=1, generate_batch=4 * B)
    list(controller.run(3))
    assert [[g[0].group_id for g in groups] for _, groups in trainer.steps] == [[1, 2], [0, 3], [4, 5]]
    assert [v for v, _ in trainer.steps] == [0, 1, 2]
    assert max(lags(trainer)) == 1  # ... and its rows generated at version 0 are trained exactly η behind


def test_many_late_groups_do_not_stop_the_run(tokenizer):
    # η = 2, one row of groups 0, 2 and 4 fails twice. Taking only "due" groups first would train 1, 3, 5 early
    # and leave three groups due at version 2, one more than a step takes; earliest-deadline-first scheduling
    # takes a late group early enough instead.
    reward = FakeReward(flaky={0, 6, 12}, times=2)
    controller, _, _, trainer = make_controller(tokenizer, reward, eta=2, generate_batch=B)
    assert len(list(controller.run(6))) == 6
    assert max(lags(trainer)) <= 2


def test_calls_completing_out_of_order_are_recorded_as_they_complete_and_deterministically(tokenizer):
    def duration(worker, method, args):  # rollout calls of even groups take 10 virtual seconds, odd ones 1
        return (10.0 if args[0][0][0] // N % 2 == 0 else 1.0) if method == "rollout" else 0.0

    def run():
        backend = ScriptedBackend(duration)
        controller, _, reward, trainer = make_controller(tokenizer, eta=2, generate_batch=N, backend=backend, rollout_calls=8)
        list(controller.run(4))
        return [[g[0].group_id for g in groups] for _, groups in trainer.steps], reward.calls, lags(trainer)

    order, scored, observed = run()
    assert scored[:2] == [[3, 4, 5], [9, 10, 11]]  # odd groups' rollouts finish first, and are scored first
    assert order[0] == [1, 3]  # the first batch is the first two groups to complete
    assert max(observed) <= 2
    assert run() == (order, scored, observed)  # the same on every run


# -- infrastructure faults --------------------------------------------------------------------------------------------
def test_infra_error_reward_is_retried_once_then_succeeds(tokenizer):
    flaky = 4
    reward = FakeReward(flaky={flaky}, times=1)
    controller, [rollout], _, _ = make_controller(tokenizer, reward)
    [result] = controller.run(1)

    assert controller.infra_retries == 1
    assert sorted(rollout.generated) == [0, 1, 2, 3, 4, 5]  # nothing is generated again ...
    assert sum(call.count(flaky) for call in reward.calls) == 2  # ... the same trajectory is scored again
    rows = trained_rows([result])
    assert rows[flaky].status is Status.OK
    assert rows[flaky][REWARD].result.reward == 1.0  # "4" is even
    assert [rows[u][REWARD].result.reward for u in (0, 1, 2, 3, 5)] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert controller.store.counts() == {"in_flight": 0, "ready": 0, "consumed": B, "dropped": 0}


def test_row_failing_every_time_ends_as_infra_error(tokenizer):
    flaky = 1
    controller, [rollout], reward, _ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), max_retries=2)
    [result] = controller.run(1)
    assert controller.infra_retries == 2
    rows = trained_rows([result])
    assert rows[flaky].status is Status.INFRA_ERROR
    assert all(r.status is Status.OK for u, r in rows.items() if u != flaky)
    assert rollout.generated.count(flaky) == 1  # a reward-side fault never regenerates the sample
    assert sum(call.count(flaky) for call in reward.calls) == 3  # the first attempt and 2 retries, never again


@pytest.mark.parametrize("role", ["rollout", "reward"])
def test_lost_worker_rows_go_back_to_the_stage_that_lost_them(tokenizer, role):
    lost = WorkerLost(f"{role}/0: actor died")
    reward = FakeReward(errors=[lost] if role == "reward" else None)
    controller, [rollout], reward, trainer = make_controller(
        tokenizer, reward, rollout_errors={0: [lost]} if role == "rollout" else None)
    results = list(controller.run(2))

    assert len(results) == 2
    first = (rollout.calls if role == "rollout" else reward.calls)[0]
    assert first == ([0, 1, 2, 3, 4, 5] if role == "rollout" else [0, 1, 2])  # rewards are scored a group a call
    assert controller.infra_retries == len(first)  # every row of the lost call, once
    assert sorted(rollout.generated) == list(range(2 * B))  # a lost rollout call generated nothing; a lost reward
    # call's rows keep their trajectories and are scored again: every row is generated once and scored once
    assert sorted(u for call in reward.calls[1 if role == "reward" else 0 :] for u in call) == list(range(2 * B))
    assert sorted(trained_rows(results)) == list(range(2 * B))
    assert all(r.status is Status.OK for r in trained_rows(results).values())


def test_rows_lost_with_their_worker_more_than_max_retries_times_are_dropped_and_replaced(tokenizer):
    errors = [WorkerLost("rollout/0: actor died"), WorkerLost("rollout/0: actor died again")]
    controller, [rollout], *_ = make_controller(tokenizer, max_retries=1, rollout_errors={0: errors})
    [result] = controller.run(1)
    assert controller.infra_retries == B  # the first loss was retried
    assert controller.faults == {"worker_lost": 2, "dropped_after_faults": B}
    assert controller.store.counts()["dropped"] == B and controller.rejected_groups == 0  # not the workflow's doing
    assert sorted(trained_rows([result])) == list(range(B, 2 * B))  # groups admitted in their place
    assert any("dropped (runtime.max_retries=1)" in line for line in controller.fault_log)


@pytest.mark.parametrize("role", ["rollout", "reward"])
def test_a_plain_error_stops_the_run_with_that_error(tokenizer, role):
    error = ValueError(f"{role} bug: bad input")
    reward = FakeReward(errors=[error] if role == "reward" else None)
    rollout_errors = {0: [error]} if role == "rollout" else None
    controller, *_, trainer = make_controller(tokenizer, reward, rollout_errors=rollout_errors)
    with pytest.raises(ValueError, match=f"{role} bug: bad input"):
        list(controller.run(1))
    assert controller.infra_retries == 0 and trainer.steps == []


# -- load balancing ---------------------------------------------------------------------------------------------------
def test_rollout_split_evenly_across_idle_workers(tokenizer):
    controller, rollouts, *_ = make_controller(tokenizer, rollout_workers=2, generate_batch=B)
    [result] = controller.run(1)
    assert [r.calls for r in rollouts] == [[[0, 1, 2]], [[3, 4, 5]]]  # one group each, not 2 groups on worker 0
    assert len(result.groups) == P


@pytest.mark.parametrize("generate_batch", [2, N, 2 * N])
def test_every_rollout_call_holds_whole_groups(tokenizer, generate_batch):
    steps = 4
    controller, rollouts, *_ = make_controller(tokenizer, eta=1, rollout_workers=2, generate_batch=generate_batch)
    results = list(controller.run(steps))
    group_of = {u: r.group_id for u, r in trained_rows(results).items()}
    members: dict[int, set[int]] = {}
    for u, g in group_of.items():
        members.setdefault(g, set()).add(u)
    assert all(r.calls for r in rollouts)  # both workers were used
    for call in (c for r in rollouts for c in r.calls):
        assert len(call) <= max(generate_batch, N)  # a group is never cut, even below generate_batch
        groups = {group_of[u] for u in call}
        assert set(call) == set().union(*(members[g] for g in groups))
    assert sorted(u for r in rollouts for u in r.generated) == list(range(steps * B))


# -- pipeline accounting ----------------------------------------------------------------------------------------------
def test_union_seconds_by_hand():
    assert union_seconds([]) == 0.0
    assert union_seconds([(1.0, 3.0)]) == 2.0
    assert union_seconds([(0.0, 1.0), (2.0, 3.5)]) == 2.5  # disjoint: summed
    assert union_seconds([(0.0, 2.0), (1.0, 3.0)]) == 3.0  # overlapping: [0, 3)
    assert union_seconds([(0.0, 5.0), (1.0, 2.0)]) == 5.0  # nested: the inner one adds nothing
    assert union_seconds([(0.0, 1.0), (1.0, 2.0)]) == 2.0  # touching
    assert union_seconds([(4.0, 6.0), (0.0, 1.0), (0.5, 2.0), (5.0, 5.5)]) == 4.0  # unsorted: [0, 2) + [4, 6)
    assert union_seconds([(1.0, 1.0), (3.0, 3.0)]) == 0.0  # empty spans


def test_pipeline_summary(tokenizer, tmp_path):
    policy = Policy()
    trainer = FakeTrainer(policy, seconds=0.002)
    controller, *_ = make_controller(tokenizer, trainer=trainer, eta=1, policy=policy, rollout_workers=2,
                                     generate_batch=N)
    controller.tracer.enabled = True
    list(controller.run(3))
    summary = controller.pipeline_summary()

    assert set(summary) == {"pipeline_seconds", "producer_busy_seconds", "trainer_busy_seconds",
                            "trainer_busy_fraction", "pipeline_efficiency"}
    assert 0 < summary["trainer_busy_fraction"] <= 1
    assert 0 < summary["pipeline_efficiency"] <= 1 + 1e-9
    assert summary["producer_busy_seconds"] <= summary["pipeline_seconds"] + 1e-9
    train_spans = controller.spans["train"]
    assert len(train_spans) == 3
    # Inline steps never overlap: the trainer's busy time is the sum of its steps, each at least 2 ms long.
    assert summary["trainer_busy_seconds"] == pytest.approx(sum(e - s for s, e in train_spans))
    assert summary["trainer_busy_seconds"] >= 3 * 0.002
    busy, wall = summary["trainer_busy_seconds"], summary["pipeline_seconds"]
    assert summary["trainer_busy_fraction"] == pytest.approx(busy / wall)
    # The trace's trainer track covers the same time (train step + publish weights).
    events = json.loads(controller.tracer.write(tmp_path / "trace.json").read_text())["traceEvents"]
    tids = {e["args"]["name"]: e["tid"] for e in events if e.get("name") == "thread_name"}
    trainer_us = sum(e["dur"] for e in events if e.get("ph") == "X" and e["tid"] == tids["trainer"]
                     and e["name"] in {"train step", "publish weights"})
    assert trainer_us / 1e6 == pytest.approx(summary["trainer_busy_seconds"], abs=1e-5)


# -- the real trainer on the controller's batches ---------------------------------------------------------------------
class Spy:
    """Wraps a training engine and keeps every batch handed to ``train_step``."""

    def __init__(self, engine: TorchTrainEngine) -> None:
        self.engine, self.batches = engine, []

    @property
    def version(self) -> int:
        return self.engine.version

    def train_step(self, batch, loss_fn, minibatches, epochs, lr_scale=1.0):
        self.batches.append(batch)
        return self.engine.train_step(batch, loss_fn, minibatches, epochs, lr_scale)

    def export_weights(self):
        return self.engine.export_weights()


def make_trainer(tokenizer, model):
    engine = Spy(TorchTrainEngine(model, lr=1e-3))
    transport = InlineWeightTransport()
    algorithm = Algorithm(ADVANTAGES.get("grpo"), policy_loss_fn("ppo_clip", "token-mean"))
    trainer = TrainerWorker(engine, transport, TextPolicyStep(algorithm, tokenizer.pad_token_id))
    return trainer, engine, transport


def test_trainer_masks_infra_error_rows(tokenizer, make_model):
    flaky = 1
    trainer, engine, transport = make_trainer(tokenizer, make_model())
    controller, *_ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), trainer=trainer, max_retries=1)
    [result] = controller.run(1)

    [batch] = engine.batches
    uids = [r.uid for g in result.groups for r in g]
    i = uids.index(flaky)
    assert result.groups[0][1].status is Status.INFRA_ERROR
    assert batch.response_mask[i].sum() == 0  # masked: no loss from the infra_error row
    assert batch.advantages[i].abs().sum() == 0
    assert all(batch.response_mask[j].sum() == 2 for j in range(len(uids)) if j != i)  # digit + EOS
    metrics = result.train.metrics
    assert torch.isfinite(torch.tensor(list(metrics.values()))).all()
    assert metrics["staleness/max"] == 0.0
    assert result.train.version == engine.version == controller.version == 1
    assert transport.latest(newer_than=0).version == 1  # the new version was published


def test_infra_error_row_takes_no_part_in_group_statistics(tokenizer, make_model):
    flaky = 2
    trainer, engine, _ = make_trainer(tokenizer, make_model())
    controller, *_ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), trainer=trainer, max_retries=0)
    [result] = controller.run(1)
    assert controller.infra_retries == 0  # max_retries=0: kept as infra_error at once
    # group 0 usable rewards: uid 0 → 1.0, uid 1 → 0.0; group 1: uids 3, 4, 5 → 0.0, 1.0, 0.0
    [batch] = engine.batches
    per_row = batch.advantages.max(dim=1).values + batch.advantages.min(dim=1).values  # the row's constant, once
    # group 0's usable rows alone, (1, 0): mean 0.5, unbiased std √0.5 → ±0.7071.
    # (Filling the infra row with the batch's usable mean 2/5 = 0.4 gives (1, 0, 0.4) → +1.0596 / -0.9272 instead.)
    assert per_row[:2].tolist() == pytest.approx([0.5 / 0.5**0.5, -0.5 / 0.5**0.5], abs=1e-4)
    assert per_row[2].item() == 0.0
    # group 1, all usable, (0, 1, 0): mean 1/3, std 1/√3 → (-1/√3, 2/√3, -1/√3).
    assert per_row[3:].tolist() == pytest.approx([-(3**-0.5), 2 * 3**-0.5, -(3**-0.5)], abs=1e-4)
