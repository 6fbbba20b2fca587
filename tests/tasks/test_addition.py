import itertools
import re

import pytest

from rollflow.api import Problem
from rollflow.tasks.addition import AdditionTask, digit_credit

# 347 + 58 = 405: operands zero-padded to max_digits=3, the sum written units digit first.
PROBLEM = Problem(prompt="347+058=", answer="504")


def test_exact_answer_scores_one_after_stripping():
    result = AdditionTask().verify(PROBLEM, " 504\n")
    assert result.reward == 1.0
    assert result.breakdown == {"exact": 1.0, "digits": 1.0, "format": 1.0}


@pytest.mark.parametrize(
    "response, digits",
    [
        ("514", 2 / 3),  # units and hundreds right, tens wrong
        ("5041", 3 / 4),  # aligned from the first character (the units): 5, 0, 4 right; a spurious final carry is wrong
        ("50", 2 / 3),  # 5 and 0 right; the missing hundreds digit is wrong
        ("405", 1 / 3),  # the usual most-significant-first order: only the middle digit lines up
        ("999", 0.0),
    ],
)
def test_partial_credit_counts_digits_in_place(response, digits):
    result = AdditionTask(partial_credit=0.5).verify(PROBLEM, response)
    assert result.breakdown["exact"] == 0.0
    assert result.breakdown["digits"] == pytest.approx(digits)
    assert result.reward == pytest.approx(0.5 * digits)


@pytest.mark.parametrize("response", ["", "five hundred four", "50 4", "-504", "504="])
def test_garbage_scores_zero_and_fails_format(response):
    result = AdditionTask().verify(PROBLEM, response)
    assert result.reward == 0.0
    assert result.breakdown["format"] == 0.0


def test_digit_credit_aligns_from_the_first_character():
    assert digit_credit("8991", "8991") == 1.0  # 999 + 999 = 1998, units first
    assert digit_credit("899", "8991") == 3 / 4  # the final carry digit is missing
    assert digit_credit("1998", "8991") == 2 / 4  # most-significant first: only the two middle 9s line up
    assert digit_credit("0991", "8991") == 3 / 4  # units digit wrong, the rest in place
    assert digit_credit("", "504") == 0.0 and digit_credit("5a4", "504") == 0.0


def test_final_carry_makes_the_answer_one_digit_longer():
    task = AdditionTask(max_digits=3)
    problem = Problem(prompt="999+999=", answer="8991")
    assert task.verify(problem, "8991").reward == 1.0
    assert task.verify(problem, "899").reward == pytest.approx(0.5 * 3 / 4)


@pytest.mark.parametrize("min_digits, max_digits", [(2, 3), (1, 5)])
def test_problems_are_well_formed_and_reference_verifies(min_digits, max_digits):
    task = AdditionTask(min_digits=min_digits, max_digits=max_digits, demo_carry_drop=0.0)  # exact references
    digit_counts = set()
    for p in itertools.islice(task.train_problems(seed=0), 500):
        a, b = re.fullmatch(rf"(\d{{{max_digits}}})\+(\d{{{max_digits}}})=", p.prompt).groups()  # padded to max_digits
        assert p.answer == str(int(a) + int(b))[::-1]  # units digit first
        assert not p.answer.endswith("0") or p.answer == "0"  # the answer itself is not padded
        for operand in (a, b):
            digit_counts.add(len(str(int(operand))))
        assert task.verify(p, task.reference(p)).reward == 1.0
    assert digit_counts == set(range(min_digits, max_digits + 1))  # every operand width is drawn


def test_eval_set_is_disjoint_from_training_stream():
    task = AdditionTask()
    eval_prompts = {p.prompt for p in task.eval_problems()}
    assert len(eval_prompts) == 500
    train_prompts = {p.prompt for p in itertools.islice(task.train_problems(seed=0), 5000)}
    assert not eval_prompts & train_prompts


def test_streams_and_eval_set_are_seeded():
    first = [p.prompt for p in itertools.islice(AdditionTask().train_problems(seed=3), 50)]
    again = [p.prompt for p in itertools.islice(AdditionTask().train_problems(seed=3), 50)]
    other = [p.prompt for p in itertools.islice(AdditionTask().train_problems(seed=4), 50)]
    assert first == again
    assert first != other
    assert AdditionTask().eval_problems() == AdditionTask().eval_problems()
    assert AdditionTask(eval_seed=1).eval_problems() != AdditionTask().eval_problems()


def test_alphabet_covers_every_character():
    task = AdditionTask(max_digits=5)
    problems = task.eval_problems() + list(itertools.islice(task.train_problems(seed=0), 2000))
    used = {c for p in problems for c in p.prompt + p.answer}
    assert used <= set(task.alphabet())


def test_rejects_bad_digit_range():
    with pytest.raises(ValueError, match=r"task\.min_digits=4 .* task\.max_digits=2"):
        AdditionTask(min_digits=4, max_digits=2)


def test_demonstrator_forgets_carries_at_the_configured_rate():
    from rollflow.api import Problem

    p = Problem("058+067=", "521")  # 125 units first; carries out of the units and the tens
    assert AdditionTask(demo_carry_drop=0.0).reference(p) == "521"
    assert AdditionTask(demo_carry_drop=1.0).reference(p) == "51"  # 8+7 → 5, 5+6 → 1, no carry ever
    assert AdditionTask(demo_carry_drop=1.0).reference(Problem("500+500=", "0001")) == "0"
    half = AdditionTask(demo_carry_drop=0.5)
    assert half.reference(p) == half.reference(p)  # one fixed demonstration per problem
    problems = list(itertools.islice(half.train_problems(0), 3000))
    carried = [q for q in problems if q.answer != AdditionTask(demo_carry_drop=1.0).reference(q)]
    exact = sum(half.reference(q) == q.answer for q in carried) / len(carried)
    assert 0.25 < exact < 0.75  # needs-a-carry problems are demonstrated right only part of the time
    assert all(half.verify(q, q.answer).reward == 1.0 for q in problems[:50])  # the verifier checks the true sum


def test_demo_carry_drop_is_validated():
    with pytest.raises(ValueError, match="task.demo_carry_drop"):
        AdditionTask(demo_carry_drop=1.5)
