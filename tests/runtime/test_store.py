"""The sample store with a recipe's declared columns: task (admission) → trajectory (versioned) → reward, and an
optional reference column read side by side with the reward."""

import random
import threading

import pytest

from rollflow.api import Column, Problem, RewardCell, RewardResult, Trajectory, TrajectoryCell
from rollflow.runtime.store import SampleStore, StoreError

TASK, TRAJECTORY, REWARD, REFERENCE = "task", "trajectory", "reward", "reference"
COLUMNS = [Column(TASK), Column(TRAJECTORY, (TASK,), versioned=True), Column(REWARD, (TRAJECTORY,))]


def make_store(reference=False):
    return SampleStore(COLUMNS + ([Column(REFERENCE, (TRAJECTORY,))] if reference else []))


def traj(tag="x", version=0):
    return TrajectoryCell.of(Trajectory([1, 5, 2, 3], [0, 0, 1, 1], [0.0, 0.0, -0.5, -0.25], [-1, -1, version, version], [], tag))


def reward(value=1.0):
    return RewardCell(RewardResult(value), 0.01)


def admit_group(store, group_id, n, version=0, eta=0):
    return store.admit(group_id, [Problem(f"p{group_id}", "a")] * n, version=version, eta=eta)


def fill(store, uids, version=0):
    for uid in uids:
        store.put(uid, TRAJECTORY, traj(str(uid), version), started=1.0, finished=2.0)
        store.put(uid, REWARD, reward(), started=2.0, finished=2.5)


def gids(groups):
    return [g[0].group_id for g in groups]


def test_row_becomes_ready_once_every_column_is_filled():
    store = make_store()
    uids = admit_group(store, 0, 2)
    assert uids == [0, 1]
    assert store.pending(TRAJECTORY) == [0, 1]
    assert store.pending(REWARD) == []
    assert store.counts() == {"in_flight": 2, "ready": 0, "consumed": 0, "dropped": 0}

    store.put(0, TRAJECTORY, traj())
    assert store.pending(TRAJECTORY) == [1]
    assert store.pending(REWARD) == [0]
    store.put(0, REWARD, reward())
    assert store.counts() == {"in_flight": 1, "ready": 1, "consumed": 0, "dropped": 0}
    assert store.complete_group(0) is None
    assert store.try_take_groups(1, version=0) is None  # row 1 is missing: the group is not complete

    fill(store, [1])
    assert store.complete_group(0) == [0, 1]
    [group] = store.try_take_groups(1, version=0)
    assert [r.uid for r in group] == [0, 1]
    assert store.counts() == {"in_flight": 0, "ready": 0, "consumed": 2, "dropped": 0}


def test_taken_rows_carry_their_cells_and_timestamps():
    store = make_store()
    [uid] = admit_group(store, 4, 1)
    fill(store, [uid])
    [[row]] = store.try_take_groups(1, version=0)
    assert row.group_id == 4 and row[TASK].prompt == "p4"
    assert row[TRAJECTORY].text == str(uid) and row[REWARD].result.reward == 1.0
    assert row.status.value == "ok"
    assert row.duration == pytest.approx(1.5)  # earliest start (the trajectory's) to latest finish (the reward's)
    assert row.timestamps[TRAJECTORY] == 2.0 and row.timestamps[REWARD] == 2.5
    assert {"admitted", "started", "finished", "consumed"} <= set(row.timestamps)


def test_oldest_complete_groups_first_even_when_completed_out_of_order():
    store = make_store()
    groups = [admit_group(store, g, 2, eta=5) for g in range(4)]
    fill(store, groups[3])  # the newest group completes first
    fill(store, groups[2])
    fill(store, groups[0])  # group 1 never completes (yet)
    taken = store.try_take_groups(2, version=0)
    assert [[r.uid for r in g] for g in taken] == [groups[0], groups[2]]  # admission order, not completion order
    assert gids(store.try_take_groups(1, version=0)) == [3]
    assert store.try_take_groups(1, version=0) is None
    fill(store, groups[1])
    assert gids(store.try_take_groups(1, version=0)) == [1]


def test_put_to_unknown_or_consumed_row_errors():
    store = make_store()
    uids = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match=r"row 99 is not in the store \(never admitted, or already consumed\)"):
        store.put(99, TRAJECTORY, traj())
    fill(store, uids)
    store.try_take_groups(1, version=0)
    with pytest.raises(StoreError, match=r"row 0 is not in the store"):
        store.put(uids[0], REWARD, reward())
    with pytest.raises(StoreError, match=r"row 0 is not in the store"):
        store.retry(uids[0])


def test_writing_a_column_twice_errors():
    store = make_store()
    [uid] = admit_group(store, 0, 1)
    store.put(uid, TRAJECTORY, traj("first"))
    with pytest.raises(StoreError, match=r"row 0 already has column 'trajectory'; a stage wrote it twice"):
        store.put(uid, TRAJECTORY, traj("second"))
    assert store.get(uid, TRAJECTORY).text == "first"


@pytest.mark.parametrize("column", [TASK, "score"])
def test_admission_and_unknown_columns_are_not_writable(column):
    store = make_store()
    [uid] = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match=rf"column '{column}' cannot be written; writable columns: trajectory, reward"):
        store.put(uid, column, object())


@pytest.mark.parametrize("columns, message", [
    ([Column("a", ("b",))], "the first column is written at admission"),
    ([Column("a"), Column("b", ("c",))], r"column 'b' reads \['c'\], which no earlier column provides"),
    ([Column("a"), Column("a")], "column 'a' is declared twice"),
])
def test_declared_columns_are_checked(columns, message):
    with pytest.raises(StoreError, match=message):
        SampleStore(columns)


def test_any_declared_schema_works():
    store = SampleStore([Column("seed"), Column("fragment", ("seed",), versioned=True)])
    [uid] = store.admit(0, [7])
    assert store.pending("fragment") == [uid]
    store.put(uid, "fragment", "steps")
    [[row]] = store.try_take_groups(1, version=0)
    assert row["seed"] == 7 and row["fragment"] == "steps"


def test_retry_clears_everything_but_the_admission_column():
    store = make_store()
    [uid] = admit_group(store, 0, 1)
    fill(store, [uid])
    assert store.counts()["ready"] == 1
    assert store.retry(uid) == 1
    assert store.get(uid, TASK).prompt == "p0"
    assert store.cells(uid).keys() == {TASK}
    assert store.pending(TRAJECTORY) == [uid]
    assert store.counts() == {"in_flight": 1, "ready": 0, "consumed": 0, "dropped": 0}
    assert store.retry(uid) == 2
    fill(store, [uid])  # writable again after the retry
    assert store.try_take_groups(1, version=0)[0][0][TRAJECTORY].text == str(uid)


def test_concurrent_producers_and_consumers_lose_nothing():
    store, n_groups, group_size, take = make_store(), 100, 4, 5
    uids = [u for g in range(n_groups) for u in admit_group(store, g, group_size, eta=n_groups)]
    order = uids[:]
    random.Random(0).shuffle(order)
    errors, consumed, takes_left = [], [], [n_groups // take]
    claim = threading.Lock()

    def produce(part):
        try:
            for uid in part:
                store.put(uid, TRAJECTORY, traj(str(uid)))
            for uid in reversed(part):
                store.put(uid, REWARD, reward())
        except Exception as e:  # surfaced below: an assert in a thread would be lost
            errors.append(e)

    def consume():
        try:
            while True:
                with claim:  # claim a take first, so no consumer waits for groups that will never come
                    if not takes_left[0]:
                        return
                    takes_left[0] -= 1
                while (groups := store.try_take_groups(take, version=0)) is None:
                    pass
                assert len(groups) == take and all(len(g) == group_size for g in groups)
                assert all(len({r.group_id for r in g}) == 1 for g in groups)
                assert gids(groups) == sorted(gids(groups))  # oldest first within a take
                consumed.extend(r.uid for g in groups for r in g)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(order[i::4],)) for i in range(4)]
    threads += [threading.Thread(target=consume) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(consumed) == len(uids) == 400  # none consumed twice ...
    assert sorted(consumed) == uids  # ... and none lost
    assert store.counts() == {"in_flight": 0, "ready": 0, "consumed": 400, "dropped": 0}


# -- the due-group rule: try_take_groups(k, version), each group under the η it was admitted with ---------------------
def test_incomplete_due_group_holds_the_batch_back():
    store = make_store()
    late = admit_group(store, 0, 2, version=0, eta=1)
    fresh = [admit_group(store, g, 2, version=1, eta=1) for g in (1, 2, 3)]
    for uids in fresh:
        fill(store, uids, version=1)
    store.put(late[0], TRAJECTORY, traj("late", version=0))
    # version 1, η = 1: group 0 (rows at version 0) is due, 0 + 1 <= 1; trained later it would be 2 behind. Three
    # other groups are complete, more than k = 2, but the trainer must wait for group 0.
    assert store.try_take_groups(2, version=1) is None
    assert store.counts() == {"in_flight": 2, "ready": 6, "consumed": 0, "dropped": 0}  # nothing taken by the attempt


def test_due_group_goes_first_then_the_oldest_other_complete_groups():
    store = make_store()
    late = admit_group(store, 0, 2, version=0, eta=1)
    fresh = [admit_group(store, g, 2, version=1, eta=1) for g in (1, 2, 3)]
    fill(store, fresh[2], version=1)  # group 3 completes first, then 0, then 2; group 1 never
    fill(store, late, version=0)
    fill(store, fresh[1], version=1)
    assert gids(store.try_take_groups(2, version=1)) == [0, 2]
    assert store.try_take_groups(2, version=1) is None  # only group 3 left complete, and nothing due
    assert gids(store.try_take_groups(1, version=1)) == [3]


def test_due_group_is_taken_ahead_of_an_older_complete_group():
    store = make_store()
    older = admit_group(store, 0, 1, version=0, eta=2)
    younger = admit_group(store, 1, 1, version=0, eta=2)
    fill(store, older, version=2)  # regenerated, say, at version 2: not due at version 2 with η = 2
    fill(store, younger, version=0)  # its tokens are from version 0: due at version 2 (0 + 2 <= 2)
    assert gids(store.try_take_groups(1, version=2)) == [1]
    assert gids(store.try_take_groups(1, version=2)) == [0]


def test_each_group_keeps_the_eta_it_was_admitted_under():
    store = make_store()
    relaxed = admit_group(store, 0, 1, version=0, eta=2)  # admitted while η was 2: due at version 2
    strict = admit_group(store, 1, 1, version=1, eta=0)  # admitted after η dropped to 0: due at version 1
    fill(store, relaxed, version=0)
    fill(store, strict, version=1)
    # At version 1 the younger group is due and the older is not, so the younger goes first.
    assert gids(store.try_take_groups(1, version=1)) == [1]
    assert gids(store.try_take_groups(1, version=1)) == [0]


def test_version_lower_bound_rises_with_the_trajectory_and_resets_on_retry():
    store = make_store()
    [row] = admit_group(store, 0, 1, version=0, eta=1)
    fill(store, admit_group(store, 1, 1, version=2, eta=1), version=2)
    # Row 0's bound is its admission version, 0: due at version 2 with η = 1, and incomplete.
    assert store.try_take_groups(1, version=2) is None
    store.put(row, TRAJECTORY, traj(version=2))  # its tokens are from version 2: bound 2, no longer due
    assert gids(store.try_take_groups(1, version=2)) == [1]
    store.retry(row)  # back to the admission version: due again
    fill(store, admit_group(store, 2, 1, version=2, eta=1), version=2)
    assert store.try_take_groups(1, version=2) is None
    store.put(row, TRAJECTORY, traj(version=1))  # bound 1: 1 + 1 <= 2, still due
    assert store.try_take_groups(1, version=2) is None
    store.put(row, REWARD, reward())
    assert gids(store.try_take_groups(1, version=2)) == [0]


def test_an_unversioned_column_does_not_move_the_bound():
    store = SampleStore([Column("task"), Column("label", ("task",))])
    [uid] = store.admit(0, ["t"], version=0, eta=1)
    store.put(uid, "label", traj(version=5))  # carries a .version, but the column is not declared versioned
    [late] = store.admit(1, ["u"], version=0, eta=1)
    with pytest.raises(StoreError, match="2 groups must be trained at version 2 but a step takes 1"):
        store.try_take_groups(1, version=2)


def test_more_due_groups_than_a_step_takes_is_an_error():
    store = make_store()
    for g in range(3):
        fill(store, admit_group(store, g, 1, version=0, eta=1), version=0)
    with pytest.raises(StoreError, match=r"3 groups must be trained at version 1 but a step takes 2; admission exceeded the "
                                         r"staleness budget"):
        store.try_take_groups(2, version=1)
    assert gids(store.try_take_groups(3, version=1)) == [0, 1, 2]  # nothing was consumed by the error


def test_reference_column_is_filled_side_by_side_with_rewards_and_required_when_declared():
    store = make_store(reference=True)
    uids = admit_group(store, 0, 2)
    assert store.pending(REFERENCE) == []  # needs the trajectory, like the reward
    for uid in uids:
        store.put(uid, TRAJECTORY, traj(str(uid)))
    assert store.pending(REFERENCE) == uids and store.pending(REWARD) == uids  # both stages may start now
    for uid in uids:
        store.put(uid, REWARD, reward())
    assert store.counts()["ready"] == 0  # the reference column is still missing
    store.put(0, REFERENCE, [-0.1, -0.2])
    store.put(1, REFERENCE, [-0.3, -0.4])
    [group] = store.try_take_groups(1, version=0)
    assert [r[REFERENCE] for r in group] == [[-0.1, -0.2], [-0.3, -0.4]]


def test_a_store_without_the_reference_column_refuses_it():
    store = make_store()
    [uid] = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match="column 'reference' cannot be written"):
        store.put(uid, REFERENCE, [0.0])


def test_dropped_group_leaves_the_store_and_is_counted_not_consumed():
    store = make_store()
    a, b = admit_group(store, 0, 2), admit_group(store, 1, 2)
    fill(store, a + b)
    assert store.drop_group(0) == 2
    assert a[0] not in store and b[0] in store
    assert store.counts() == {"in_flight": 0, "ready": 2, "consumed": 0, "dropped": 2}
    [group] = store.try_take_groups(1, version=0)
    assert [r.uid for r in group] == b
    with pytest.raises(StoreError, match="group 0 is not in the store"):
        store.drop_group(0)
    with pytest.raises(StoreError, match="group 2 is already in the store"):
        admit_group(store, 2, 1)
        admit_group(store, 2, 1)


def test_retrying_a_column_clears_it_and_what_reads_it_and_keeps_the_rest():
    store = make_store(reference=True)
    [uid] = admit_group(store, 0, 1, version=0, eta=1)
    store.put(uid, TRAJECTORY, traj("t", version=3))
    store.put(uid, REWARD, reward())
    store.put(uid, REFERENCE, [-0.1])
    assert store.retry(uid, REWARD) == 1
    assert store.cells(uid).keys() == {TASK, TRAJECTORY, REFERENCE}  # the reward alone is redone ...
    assert store.pending(REWARD) == [uid] and store.pending(TRAJECTORY) == []
    assert store.get(uid, TRAJECTORY).text == "t"  # ... on the same trajectory
    fill_reward = store.put(uid, REWARD, reward(0.5))
    assert fill_reward is None and store.counts()["ready"] == 1
    assert store.retry(uid, TRAJECTORY) == 2  # a trajectory retried takes everything computed from it along
    assert store.cells(uid).keys() == {TASK}
