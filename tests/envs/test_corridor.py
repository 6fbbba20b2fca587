"""Corridor's dynamics, by hand: where an episode starts, what each step pays, when it ends."""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from rollflow.envs import CORRIDOR, Corridor
from rollflow.envs.corridor import LEFT, RIGHT


def one_hot(n, i):
    return np.eye(n, dtype=np.float32)[i]


def test_walking_right_reaches_the_goal_with_the_expected_rewards():
    env = Corridor(n=5, max_steps=20, step_cost=0.1)
    obs, _ = env.reset(seed=3)
    start = env.position
    np.testing.assert_array_equal(obs, one_hot(5, start))
    rewards = []
    for k in range(1, 5 - start):
        obs, reward, terminated, truncated, _ = env.step(RIGHT)
        rewards.append(reward)
        np.testing.assert_array_equal(obs, one_hot(5, start + k))
        assert terminated == (start + k == 4) and not truncated
    assert rewards == pytest.approx([-0.1] * (3 - start) + [0.9])
    assert sum(rewards) == pytest.approx(1 - (4 - start) * 0.1)  # the best return from `start`, as documented


def test_walls_hold_and_the_episode_is_truncated_after_max_steps():
    env = Corridor(n=4, max_steps=3, step_cost=0.05)
    env.reset(seed=0)
    outcomes = [env.step(LEFT) for _ in range(3)]
    assert env.position == 0  # three lefts from any start cell (0, 1 or 2) end against the wall
    np.testing.assert_array_equal(outcomes[-1][0], one_hot(4, 0))
    assert [o[1] for o in outcomes] == pytest.approx([-0.05] * 3)
    assert [(o[2], o[3]) for o in outcomes] == [(False, False), (False, False), (False, True)]


def test_reaching_the_goal_on_the_last_allowed_step_terminates_rather_than_truncates():
    env = Corridor(n=3, max_steps=1, step_cost=0.0)
    env.reset(seed=0)
    env.position = 1  # one step from the goal
    _, reward, terminated, truncated, _ = env.step(RIGHT)
    assert (reward, terminated, truncated) == (1.0, True, False)


def test_start_cell_is_seeded_and_never_the_goal():
    starts = {}
    for seed in range(40):
        env = Corridor(n=4)
        env.reset(seed=seed)
        starts[seed] = env.position
        env.reset(seed=seed)
        assert env.position == starts[seed]
    assert set(starts.values()) == {0, 1, 2}


def test_reset_clears_the_step_count():
    env = Corridor(n=6, max_steps=2)
    env.reset(seed=1)
    env.step(LEFT)
    env.reset()
    assert env.step(LEFT)[3] is False  # one step into the new episode, not the old one's second


def test_bad_arguments_are_refused_with_what_to_give():
    with pytest.raises(ValueError, match="n >= 2"):
        Corridor(n=1)
    env = Corridor()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"0 \(left\) or 1 \(right\), got 2"):
        env.step(2)


def test_registered_with_gymnasium_and_passes_its_checker():
    env = gymnasium.make(CORRIDOR, n=7, max_steps=9)
    check_env(env.unwrapped)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (7,) and obs.dtype == np.float32 and env.unwrapped.max_steps == 9
