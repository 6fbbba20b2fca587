import torch

from rollflow.algos.batch import collate


def batch_of(groups: int, size: int):
    rows = groups * size
    batch = collate([[1, 2]] * rows, [[3 + i % 5] for i in range(rows)], pad_id=0)
    batch.group_ids = torch.arange(groups).repeat_interleave(size)
    return batch


def test_split_keeps_every_group_in_one_minibatch():
    batch = batch_of(groups=6, size=4)
    batch.advantages[:, 2] = torch.arange(len(batch)).float()  # a row's identity survives selection
    for seed in range(5):
        parts = batch.split(2, torch.Generator().manual_seed(seed))
        assert [len(p) for p in parts] == [12, 12]
        seen = torch.cat([p.advantages[:, 2] for p in parts]).long()
        assert sorted(seen.tolist()) == list(range(24))  # every row exactly once
        for p in parts:
            counts = torch.bincount(p.group_ids, minlength=6)
            assert set(counts.tolist()) <= {0, 4}  # a group is all in or all out


def test_split_shuffles_groups_between_minibatches():
    batch = batch_of(groups=8, size=2)
    firsts = {tuple(sorted(batch.split(2, torch.Generator().manual_seed(s))[0].group_ids.unique().tolist())) for s in range(10)}
    assert len(firsts) > 1


def test_split_falls_back_to_rows_when_groups_are_fewer_than_minibatches():
    batch = batch_of(groups=1, size=4)
    parts = batch.split(2, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [2, 2]


def test_split_without_groups_cuts_rows():
    batch = batch_of(groups=3, size=3)
    batch.group_ids = None
    assert [len(p) for p in batch.split(4, torch.Generator().manual_seed(0))] == [3, 2, 2, 2]
