import pytest
import torch

from rollflow.api import TrainBatch


def numbered_batch(rows: int, T: int = 3) -> TrainBatch:
    ids = torch.arange(rows)[:, None].expand(rows, T).clone()  # row i holds i everywhere
    return TrainBatch(ids, torch.ones_like(ids), ids.float(), -ids.float(), -ids.float(), 2 * ids.float(), ids.clone())


def test_select_keeps_every_column_aligned():
    part = numbered_batch(5).select(torch.tensor([3, 1]))
    assert len(part) == 2
    assert part.input_ids[:, 0].tolist() == [3, 1]
    assert part.response_mask[:, 0].tolist() == [3.0, 1.0]
    assert part.old_logprobs[:, 0].tolist() == [-3.0, -1.0]
    assert part.advantages[:, 0].tolist() == [6.0, 2.0]
    assert part.versions[:, 0].tolist() == [3, 1]


@pytest.mark.parametrize("rows, n", [(8, 2), (8, 8), (7, 1), (9, 3)])
def test_split_shuffles_and_covers_every_row_once(rows, n):
    parts = numbered_batch(rows).split(n, torch.Generator().manual_seed(0))
    assert len(parts) == n
    assert {len(p) for p in parts} == {rows // n}
    seen = torch.cat([p.input_ids[:, 0] for p in parts]).tolist()
    assert sorted(seen) == list(range(rows))
    for p in parts:  # columns stay together after the shuffle
        assert torch.equal(p.advantages[:, 0], 2 * p.input_ids[:, 0].float())


def test_split_is_seeded():
    a = numbered_batch(8).split(2, torch.Generator().manual_seed(1))
    b = numbered_batch(8).split(2, torch.Generator().manual_seed(1))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
