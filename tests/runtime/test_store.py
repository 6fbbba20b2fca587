import random
import threading

import pytest

from rollflow.api import (
    GENERATION,
    PROMPT,
    REWARD,
    Generation,
    GenerationCell,
    Problem,
    PromptCell,
    RewardCell,
    RewardResult,
)
from rollflow.runtime.store import SampleStore, StoreError


def gen(tag="x", version=0):
    return GenerationCell.of(Generation([1, 2], tag, [-0.5, -0.25], [version, version], "eos"))


def reward(value=1.0):
    return RewardCell(RewardResult(value), 0.01)


def admit_group(store, group_id, n, version=0):
    return store.admit([PromptCell(group_id, Problem(f"p{group_id}", "a"), [1, 5])] * n, version=version)


def fill(store, uids, version=0):
    for uid in uids:
        store.put(uid, GENERATION, gen(str(uid), version), started=1.0)
        store.put(uid, REWARD, reward(), finished=2.5)


def test_row_becomes_ready_once_every_column_is_filled():
    store = SampleStore()
    uids = admit_group(store, 0, 2)
    assert uids == [0, 1]
    assert store.pending(GENERATION) == [0, 1]
    assert store.pending(REWARD) == []
    assert store.counts() == {"in_flight": 2, "ready": 0, "consumed": 0, "dropped": 0}

    store.put(0, GENERATION, gen())
    assert store.pending(GENERATION) == [1]
    assert store.pending(REWARD) == [0]
    store.put(0, REWARD, reward())
    assert store.counts() == {"in_flight": 1, "ready": 1, "consumed": 0, "dropped": 0}
    with pytest.raises(TimeoutError, match=r"only 0 of 1 groups became complete within 0\.01s"):
        store.take_groups(1, timeout=0.01)  # row 1 is missing: the group is not complete

    fill(store, [1])
    [group] = store.take_groups(1, timeout=0)
    assert [r.uid for r in group] == [0, 1]
    assert store.counts() == {"in_flight": 0, "ready": 0, "consumed": 2, "dropped": 0}


def test_taken_rows_carry_their_cells_and_timestamps():
    store = SampleStore()
    [uid] = admit_group(store, 4, 1)
    fill(store, [uid])
    [[row]] = store.take_groups(1, timeout=0)
    assert row.group_id == 4 and row.prompt.problem.prompt == "p4"
    assert row.generation.response_text == str(uid)
    assert row.status.value == "ok"
    assert row.duration == pytest.approx(1.5)
    assert {"admitted", "started", "finished", "consumed"} <= set(row.timestamps)


def test_oldest_complete_groups_first_even_when_completed_out_of_order():
    store = SampleStore()
    groups = [admit_group(store, g, 2) for g in range(4)]
    fill(store, groups[3])  # the newest group completes first
    fill(store, groups[2])
    fill(store, groups[0])  # group 1 never completes
    taken = store.take_groups(2, timeout=0)
    assert [[r.uid for r in g] for g in taken] == [groups[0], groups[2]]  # admission order, not completion order
    assert [g[0].group_id for g in store.take_groups(1, timeout=0)] == [3]
    with pytest.raises(TimeoutError):
        store.take_groups(1, timeout=0.01)
    fill(store, groups[1])
    assert [g[0].group_id for g in store.take_groups(1, timeout=0)] == [1]


def test_put_to_unknown_or_consumed_row_errors():
    store = SampleStore()
    uids = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match=r"row 99 is not in the store \(never admitted, or already consumed\)"):
        store.put(99, GENERATION, gen())
    fill(store, uids)
    store.take_groups(1, timeout=0)
    with pytest.raises(StoreError, match=r"row 0 is not in the store"):
        store.put(uids[0], REWARD, reward())
    with pytest.raises(StoreError, match=r"row 0 is not in the store"):
        store.retry(uids[0])


def test_writing_a_column_twice_errors():
    store = SampleStore()
    [uid] = admit_group(store, 0, 1)
    store.put(uid, GENERATION, gen("first"))
    with pytest.raises(StoreError, match=r"row 0 already has column 'generation'; a stage wrote it twice"):
        store.put(uid, GENERATION, gen("second"))
    assert store.get(uid, GENERATION).response_text == "first"


@pytest.mark.parametrize("column", [PROMPT, "score"])
def test_prompt_and_unknown_columns_are_not_writable(column):
    store = SampleStore()
    [uid] = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match=rf"column '{column}' cannot be written; writable columns: generation, reward"):
        store.put(uid, column, object())


def test_retry_clears_generation_and_reward_but_keeps_the_prompt():
    store = SampleStore()
    [uid] = admit_group(store, 0, 1)
    fill(store, [uid])
    assert store.counts()["ready"] == 1
    assert store.retry(uid) == 1
    assert store.get(uid, PROMPT).problem.prompt == "p0"
    with pytest.raises(KeyError):
        store.get(uid, GENERATION)
    assert store.pending(GENERATION) == [uid]
    assert store.counts() == {"in_flight": 1, "ready": 0, "consumed": 0, "dropped": 0}
    assert store.retry(uid) == 2
    fill(store, [uid])  # writable again after the retry
    assert store.take_groups(1, timeout=0)[0][0].generation.response_text == str(uid)


def test_concurrent_producers_and_consumers_lose_nothing():
    store, n_groups, group_size, take = SampleStore(), 100, 4, 5
    uids = [u for g in range(n_groups) for u in admit_group(store, g, group_size)]
    order = uids[:]
    random.Random(0).shuffle(order)
    errors, consumed, takes_left = [], [], [n_groups // take]
    claim = threading.Lock()

    def produce(part):
        try:
            for uid in part:
                store.put(uid, GENERATION, gen(str(uid)))
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
                groups = store.take_groups(take, timeout=10)
                assert len(groups) == take and all(len(g) == group_size for g in groups)
                assert all(len({r.group_id for r in g}) == 1 for g in groups)
                gids = [g[0].group_id for g in groups]
                assert gids == sorted(gids)  # oldest first within a take
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
    assert store.consumed_total == 400


# -- the due-group rule: try_take_groups(k, version, eta) --------------------------------------------------------------
def gids(groups):
    return [g[0].group_id for g in groups]


def test_incomplete_due_group_holds_the_batch_back():
    store = SampleStore()
    late = admit_group(store, 0, 2, version=0)
    fresh = [admit_group(store, g, 2, version=1) for g in (1, 2, 3)]
    for uids in fresh:
        fill(store, uids, version=1)
    store.put(late[0], GENERATION, gen("late", version=0))
    # version 1, η = 1: group 0 (rows at version 0) is due, 0 + 1 <= 1; trained later it would be 2 behind. Three
    # other groups are complete, more than k = 2, but the trainer must wait for group 0.
    assert store.try_take_groups(2, version=1, eta=1) is None
    with pytest.raises(TimeoutError):
        store.take_groups(2, timeout=0, version=1, eta=1)
    assert store.counts() == {"in_flight": 2, "ready": 6, "consumed": 0, "dropped": 0}  # nothing taken by the failed attempts
    assert gids(store.take_groups(2, timeout=0)) == [1, 2]  # without version/eta: simply the oldest complete


def test_due_group_goes_first_then_the_oldest_other_complete_groups():
    store = SampleStore()
    late = admit_group(store, 0, 2, version=0)
    fresh = [admit_group(store, g, 2, version=1) for g in (1, 2, 3)]
    fill(store, fresh[2], version=1)  # group 3 completes first, then 0, then 2; group 1 never
    fill(store, late, version=0)
    fill(store, fresh[1], version=1)
    assert gids(store.try_take_groups(2, version=1, eta=1)) == [0, 2]
    assert store.try_take_groups(2, version=1, eta=1) is None  # only group 3 left complete, and nothing due
    assert gids(store.try_take_groups(1, version=1, eta=1)) == [3]


def test_due_group_is_taken_ahead_of_an_older_complete_group():
    store = SampleStore()
    older = admit_group(store, 0, 1, version=0)
    younger = admit_group(store, 1, 1, version=0)
    fill(store, older, version=2)  # regenerated, say, at version 2: not due at version 2 with η = 2
    fill(store, younger, version=0)  # its tokens are from version 0: due at version 2 (0 + 2 <= 2)
    assert gids(store.try_take_groups(1, version=2, eta=2)) == [1]
    assert gids(store.try_take_groups(1, version=2, eta=2)) == [0]


def test_nothing_due_takes_the_oldest_complete_groups_in_admission_order():
    store = SampleStore()
    groups = [admit_group(store, g, 2, version=0) for g in range(4)]
    for g in (3, 2, 0):  # completed newest first; group 1 never
        fill(store, groups[g], version=0)
    assert store.try_take_groups(4, version=0, eta=0 + 3) is None  # only 3 complete
    assert gids(store.try_take_groups(2, version=0, eta=3)) == [0, 2]
    assert gids(store.try_take_groups(1, version=0, eta=3)) == [3]


def test_version_lower_bound_rises_with_the_generation_and_resets_on_retry():
    store = SampleStore()
    [row] = admit_group(store, 0, 1, version=0)
    fill(store, admit_group(store, 1, 1, version=2), version=2)
    # Row 0's bound is its admission version, 0: due at version 2 with η = 1, and incomplete.
    assert store.try_take_groups(1, version=2, eta=1) is None
    store.put(row, GENERATION, gen(version=2))  # its tokens are from version 2: bound 2, no longer due
    assert gids(store.try_take_groups(1, version=2, eta=1)) == [1]
    store.retry(row)  # back to the admission version: due again
    assert store.try_take_groups(1, version=2, eta=1) is None
    store.put(row, GENERATION, gen(version=1))  # bound 1: 1 + 1 <= 2, still due
    assert store.try_take_groups(1, version=2, eta=1) is None
    store.put(row, REWARD, reward())
    assert gids(store.try_take_groups(1, version=2, eta=1)) == [0]


def test_more_due_groups_than_a_step_takes_is_an_error():
    store = SampleStore()
    for g in range(3):
        fill(store, admit_group(store, g, 1, version=0), version=0)
    with pytest.raises(StoreError, match=r"3 groups must be trained at version 1 but a step takes 2; admission exceeded the "
                                         r"staleness budget"):
        store.try_take_groups(2, version=1, eta=1)
    with pytest.raises(StoreError, match="staleness budget"):
        store.take_groups(2, timeout=0, version=1, eta=1)
    assert gids(store.try_take_groups(3, version=1, eta=1)) == [0, 1, 2]  # nothing was consumed by the errors


def test_blocking_take_with_version_times_out():
    store = SampleStore()
    admit_group(store, 0, 1, version=0)
    fill(store, admit_group(store, 1, 1, version=1), version=1)
    with pytest.raises(TimeoutError, match=r"only 1 of 1 groups became complete within 0s"):
        store.take_groups(1, timeout=0, version=1, eta=1)  # group 0 is due and incomplete
    assert gids(store.take_groups(1, timeout=0, version=1, eta=2)) == [1]  # η = 2: nothing due


def test_blocking_take_wakes_when_the_due_group_completes():
    store = SampleStore()
    late = admit_group(store, 0, 1, version=0)
    fill(store, admit_group(store, 1, 1, version=1), version=1)
    timer = threading.Timer(0.05, fill, (store, late))
    timer.start()
    try:
        assert gids(store.take_groups(1, timeout=5, version=1, eta=1)) == [0]
    finally:
        timer.join()


def test_reference_column_is_filled_side_by_side_with_rewards_and_required_when_configured():
    store = SampleStore(("prompt", "generation", "reward", "reference"))
    uids = admit_group(store, 0, 2)
    assert store.pending("reference") == []  # needs the generation, like the reward
    for uid in uids:
        store.put(uid, GENERATION, gen(str(uid)))
    assert store.pending("reference") == uids and store.pending(REWARD) == uids  # both stages may start now
    fill_rewards = [store.put(uid, REWARD, reward()) for uid in uids]
    assert len(fill_rewards) == 2 and store.counts()["ready"] == 0  # the reference column is still missing
    store.put(0, "reference", [-0.1, -0.2])
    store.put(1, "reference", [-0.3, -0.4])
    [group] = store.take_groups(1, timeout=0)
    assert [r.reference for r in group] == [[-0.1, -0.2], [-0.3, -0.4]]


def test_a_store_without_the_reference_column_refuses_it():
    store = SampleStore()
    [uid] = admit_group(store, 0, 1)
    with pytest.raises(StoreError, match="column 'reference' cannot be written"):
        store.put(uid, "reference", [0.0])


def test_dropped_group_leaves_the_store_and_is_counted_not_consumed():
    store = SampleStore()
    a, b = admit_group(store, 0, 2), admit_group(store, 1, 2)
    fill(store, a + b)
    assert store.group_rows(a[0]) == a
    store.drop_group(a)
    assert a[0] not in store and b[0] in store
    assert store.counts() == {"in_flight": 0, "ready": 2, "consumed": 0, "dropped": 2}
    [group] = store.take_groups(1, timeout=0)
    assert [r.uid for r in group] == b
    with pytest.raises(StoreError, match="needs every row of group"):
        c = admit_group(store, 2, 2)
        store.drop_group(c[:1])


def test_group_rows_waits_for_every_reward():
    store = SampleStore()
    uids = admit_group(store, 0, 2)
    fill(store, uids[:1])
    assert store.group_rows(uids[0]) is None
