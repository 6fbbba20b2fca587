import math
import statistics
import time

from rollflow.api import Problem
from rollflow.tasks import build_task
from rollflow.tasks.latency import latency, with_reward_latency


def test_latency_is_deterministic_lognormal_and_capped():
    problems = [Problem(f"{i}+{i}=", str(2 * i)) for i in range(2000)]
    xs = [latency(0, p, "12", median=0.2, sigma=0.75, cap=2.0) for p in problems]
    assert xs == [latency(0, p, "12", 0.2, 0.75, 2.0) for p in problems]  # same inputs, same delay
    assert xs != [latency(1, p, "12", 0.2, 0.75, 2.0) for p in problems]  # the seed changes them
    assert max(xs) <= 2.0 and min(xs) > 0
    assert math.isclose(statistics.median(xs), 0.2, rel_tol=0.1)
    logs = [math.log(x) for x in xs if x < 2.0]
    assert 0.65 < statistics.stdev(logs) < 0.8


def test_slow_task_sleeps_then_scores_like_the_task():
    from rollflow.config.schema import AdditionTaskConfig

    task = build_task(AdditionTaskConfig(), seed=0)
    problem = next(task.train_problems(0))
    slow = with_reward_latency(task, median=0.05, sigma=0.1, cap=0.06)
    t = time.perf_counter()
    result = slow.verify(problem, problem.answer)
    assert time.perf_counter() - t >= latency(0, problem, problem.answer, 0.05, 0.1, 0.06) * 0.9
    assert result == task.verify(problem, problem.answer) and result.reward >= 1.0
    assert task.verify is not slow.verify  # the original task is untouched
