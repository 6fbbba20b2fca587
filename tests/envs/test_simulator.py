"""``envs.simulator``: environments made by id or entry point, with the config's wrappers, and refused clearly."""

import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest

from rollflow.envs.simulator import CostlyStep, EnvSpecError, env_spec, make_env


def test_a_registered_id_and_its_frame_stack():
    env = make_env("CartPole-v1", frame_stack=3)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (3, 4)
    first = obs[-1].copy()
    obs, *_ = env.step(0)
    assert np.array_equal(obs[-2], first)  # oldest first: the newest frame is last, the previous one before it
    assert env_spec("CartPole-v1", frame_stack=3).observation_shape == (3, 4)


def test_minigrid_gives_its_image_and_is_described_as_one():
    env = make_env("MiniGrid-DoorKey-5x5-v0")
    obs, _ = env.reset(seed=1)
    assert obs.shape == (7, 7, 3) and obs.dtype == np.uint8
    spec = env_spec("MiniGrid-DoorKey-5x5-v0")
    assert spec.image and spec.actions == 7 and spec.observation_shape == (7, 7, 3)
    # the seed fixes the layout: the same seed twice gives the same first view, another seed another one
    again, _ = make_env("MiniGrid-DoorKey-5x5-v0").reset(seed=1)
    others = [make_env("MiniGrid-DoorKey-5x5-v0").reset(seed=s)[0] for s in range(2, 8)]
    assert np.array_equal(obs, again) and any(not np.array_equal(obs, o) for o in others)


def test_an_entry_point_file_with_keyword_arguments(tmp_path):
    (tmp_path / "walk.py").write_text(textwrap.dedent("""
        import gymnasium as gym
        import numpy as np

        class Walk(gym.Env):
            def __init__(self, size=3):
                self.size = size
                self.observation_space = gym.spaces.Box(0, 1, (size,), np.float32)
                self.action_space = gym.spaces.Discrete(2)

            def reset(self, seed=None, options=None):
                super().reset(seed=seed)
                return np.zeros(self.size, np.float32), {}

            def step(self, action):
                return np.ones(self.size, np.float32), 1.0, True, False, {}
    """))
    env = make_env(f"{tmp_path / 'walk.py'}:Walk", {"size": 5})
    assert env.reset(seed=0)[0].shape == (5,)
    assert env_spec(f"{tmp_path / 'walk.py'}:Walk", {"size": 5}).observation_shape == (5,)
    assert env_spec("gymnasium.envs.classic_control:CartPoleEnv").actions == 2  # a module on the path


@pytest.mark.parametrize(("env", "message"), [
    ("NoSuchEnv-v0", "registered Gymnasium id"),
    ("no_such_module:Env", "cannot import 'no_such_module'"),
    ("gymnasium:NoSuchClass", "'gymnasium' has no 'NoSuchClass'"),
    ("/nowhere/env.py:Env", "no file"),
    ("Pendulum-v1", "Box action space"),
])
def test_an_environment_that_cannot_be_used_is_refused_naming_the_key(env, message):
    with pytest.raises(EnvSpecError, match="sim.env=") as info:
        env_spec(env)
    assert message in str(info.value)


def test_a_costly_step_spends_its_time_computing(monkeypatch):
    env = CostlyStep(gym.make("CartPole-v1"), 0.02)
    env.reset(seed=0)
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("CostlyStep slept"))
    wall, cpu = time.perf_counter(), time.process_time()
    env.step(0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # it computes (CPU time; a share of the wall time, which other processes on the machine may take some of)
    assert wall >= 0.02 and cpu >= 0.2 * wall, (wall, cpu)
