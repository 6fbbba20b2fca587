"""The `guess` task's held-out set: many problems over a few letter pairs that training never asks for."""

import itertools

import pytest

from rollflow.tasks.guess import GuessTask


def test_held_out_pairs_are_never_trained_on_and_each_gets_new_tables():
    task = GuessTask(eval_size=200, eval_pairs=40)
    held_out = task.eval_problems()
    assert len(held_out) == 200 and len({p.prompt for p in held_out}) == 40
    assert len({tuple(sorted(p.meta["table"].items())) for p in held_out}) == 200  # a new table per problem
    for p in held_out:
        table = p.meta["table"]
        assert int(p.answer) == table[p.prompt[0]] + table[p.prompt[2]]
    trained = {p.prompt for p in itertools.islice(task.train_problems(seed=3), 3000)}
    assert len(trained) == 12 * 11 - 40 and not trained & {p.prompt for p in held_out}
    assert [p.prompt for p in GuessTask().eval_problems()] == [p.prompt for p in held_out]  # the same every run


def test_holding_out_every_pair_is_refused():
    with pytest.raises(ValueError, match=r"task.eval_pairs=12 letter pairs of the 12 that 4 letters make; give 1 to 11"):
        GuessTask(letters=4, lazy_letters=1, eval_pairs=12)
