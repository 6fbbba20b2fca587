import itertools
import re

import pytest

from rollflow.api import Problem
from rollflow.tasks.sorting import SortingTask

PROBLEM = Problem(prompt="sort:3172=", answer="1237")


def test_exact_answer_scores_one_after_stripping():
    result = SortingTask().verify(PROBLEM, "1237 \n")
    assert result.reward == 1.0
    assert result.breakdown == {"exact": 1.0, "positions": 1.0, "format": 1.0}


@pytest.mark.parametrize(
    "response, positions, is_permutation",
    [
        ("1273", 2 / 4, 1.0),  # 1, 2 in place; 7, 3 swapped
        ("3172", 0 / 4, 1.0),  # the input unchanged: a permutation, no digit in place
        ("123", 3 / 4, 0.0),  # a missing digit costs its position
        ("12377", 4 / 5, 0.0),  # an extra digit is charged as a wrong position
        ("1238", 3 / 4, 0.0),  # 8 is not in the input
    ],
)
def test_partial_credit_counts_positions(response, positions, is_permutation):
    result = SortingTask(partial_credit=0.5).verify(PROBLEM, response)
    assert result.breakdown == {"exact": 0.0, "positions": pytest.approx(positions), "format": is_permutation}
    assert result.reward == pytest.approx(0.5 * positions)


@pytest.mark.parametrize("response", ["", "abcd", "one two", "sort:1237="])
def test_garbage_scores_zero_and_fails_format(response):
    result = SortingTask().verify(PROBLEM, response)
    assert result.reward == 0.0
    assert result.breakdown["format"] == 0.0


def test_problems_are_well_formed_and_cover_every_length():
    task = SortingTask(min_len=2, max_len=5)
    lengths = set()
    for p in itertools.islice(task.train_problems(seed=0), 1000):
        digits = re.fullmatch(r"sort:(\d+)=", p.prompt).group(1)
        assert p.answer == "".join(sorted(digits))
        assert task.verify(p, task.reference(p)).reward == 1.0
        lengths.add(len(digits))
    assert lengths == {2, 3, 4, 5}


def test_eval_set_is_disjoint_from_training_stream():
    task = SortingTask()
    eval_prompts = {p.prompt for p in task.eval_problems()}
    assert len(eval_prompts) == 500
    train_prompts = {p.prompt for p in itertools.islice(task.train_problems(seed=0), 5000)}
    assert not eval_prompts & train_prompts


def test_streams_and_eval_set_are_seeded():
    first = [p.prompt for p in itertools.islice(SortingTask().train_problems(seed=3), 50)]
    again = [p.prompt for p in itertools.islice(SortingTask().train_problems(seed=3), 50)]
    other = [p.prompt for p in itertools.islice(SortingTask().train_problems(seed=4), 50)]
    assert first == again
    assert first != other
    assert SortingTask().eval_problems() == SortingTask().eval_problems()
    assert SortingTask(eval_seed=1).eval_problems() != SortingTask().eval_problems()


def test_alphabet_covers_every_character():
    task = SortingTask()
    problems = task.eval_problems() + list(itertools.islice(task.train_problems(seed=0), 2000))
    used = {c for p in problems for c in p.prompt + p.answer}
    assert used == set(task.alphabet())
    assert len(task.alphabet()) == len(set(task.alphabet()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_len": 0}, r"task\.min_len=0"),
        ({"min_len": 5, "max_len": 4}, r"task\.min_len=5 .* task\.max_len=4"),
        ({"partial_credit": 1.5}, r"task\.partial_credit=1\.5"),
        ({"eval_size": 0}, r"task\.eval_size=0"),
    ],
)
def test_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SortingTask(**kwargs)


def test_too_few_distinct_problems_for_eval_set():
    # Length-1 inputs allow only ten distinct problems.
    task = SortingTask(min_len=1, max_len=1, eval_size=11)
    with pytest.raises(ValueError, match=r"fewer than eval_size=11 .* task\.eval_size"):
        task.eval_problems()
