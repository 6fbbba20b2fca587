import random
import threading

import pytest

from rollflow.api import GENERATION, PROMPT, REWARD, Generation, Problem, PromptCell, RewardCell, RewardResult
from rollflow.runtime.store import SampleStore, StoreError


def gen(tag="x"):
    return Generation([1, 2], tag, [-0.5, -0.25], [0, 0], "eos")


def reward(value=1.0):
    return RewardCell(RewardResult(value), 0.01)


def admit_group(store, group_id, n):
    return store.admit([PromptCell(group_id, Problem(f"p{group_id}", "a"), [1, 5])] * n)


def fill(store, uids):
    for uid in uids:
        store.put(uid, GENERATION, gen(str(uid)), started=1.0)
        store.put(uid, REWARD, reward(), finished=2.5)


def test_row_becomes_ready_once_every_column_is_filled():
    store = SampleStore()
    uids = admit_group(store, 0, 2)
    assert uids == [0, 1]
    assert store.pending(GENERATION) == [0, 1]
    assert store.pending(REWARD) == []
    assert store.counts() == {"in_flight": 2, "ready": 0, "consumed": 0}

    store.put(0, GENERATION, gen())
    assert store.pending(GENERATION) == [1]
    assert store.pending(REWARD) == [0]
    store.put(0, REWARD, reward())
    assert store.counts() == {"in_flight": 1, "ready": 1, "consumed": 0}
    with pytest.raises(TimeoutError, match=r"only 0 of 1 groups became complete within 0\.01s"):
        store.take_groups(1, timeout=0.01)  # row 1 is missing: the group is not complete

    fill(store, [1])
    [group] = store.take_groups(1, timeout=0)
    assert [r.uid for r in group] == [0, 1]
    assert store.counts() == {"in_flight": 0, "ready": 0, "consumed": 2}


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
    assert store.counts() == {"in_flight": 1, "ready": 0, "consumed": 0}
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
    assert store.counts() == {"in_flight": 0, "ready": 0, "consumed": 400}
    assert store.consumed_total == 400
