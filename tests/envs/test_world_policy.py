"""The cross-view worlds' actor-critic: both goal layouts, a goal that steers it, and its use as a user policy class
(``sim.policy: module:Class``) in the simulator recipe."""

import pytest
import torch

from rollflow.config import ConfigError, load_config
from rollflow.envs.simulator import EnvSpecError, env_spec
from rollflow.envs.world_policy import CrossViewPolicy
from rollflow.envs.worlds import MARK, CrossViewWorld
from rollflow.recipes.sim import build_policy


def observations(goal, n=8):
    env = CrossViewWorld(goal=goal)
    return torch.stack([torch.as_tensor(env.reset(seed=s)[0]) for s in range(n)])


@pytest.mark.parametrize("goal", ["crossview", "id"])
def test_both_goal_layouts_give_logits_and_values(goal):
    obs = observations(goal)
    model = CrossViewPolicy(tuple(obs.shape[1:]), 7, seed=1)
    assert model.goal == goal
    assert model(obs).shape == (8, 7) and model.value(obs).shape == (8,)
    assert torch.equal(CrossViewPolicy(tuple(obs.shape[1:]), 7, seed=1)(obs), model(obs))  # seeded


def test_the_masked_cell_of_the_goal_view_steers_the_policy():
    obs = observations("crossview", 1)
    model = CrossViewPolicy(tuple(obs.shape[1:]), 7)
    goal_view = obs[0, :, :, 3]
    objects = [(i, j) for i in range(7) for j in range(7) if goal_view[i, j] > 3]  # cells holding an object
    moved = obs.clone()
    moved[0, :, :, 6] = 0
    other = next(c for c in objects if obs[0, c[0], c[1], 6] != MARK)
    moved[0, other[0], other[1], 6] = MARK  # the same picture, another cell marked as the target
    assert not torch.allclose(model(obs), model(moved))


def test_other_observations_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="sim.frame_stack must be 1"):
        CrossViewPolicy((4, 7, 7, 10), 7)
    with pytest.raises(ValueError, match=r"\(7, 7, 10\) or \(7, 7, 16\)"):
        CrossViewPolicy((7, 7, 3), 7)


CROSSVIEW = "configs/sim/crossview.yaml"


def test_a_policy_class_is_built_from_the_config_and_checked(tmp_path):
    spec = env_spec("rollflow.envs.worlds:CrossViewWorld", {"goal": "id"})
    config = load_config(CROSSVIEW, ["sim.policy=rollflow.envs.world_policy:CrossViewPolicy",
                                     "sim.policy_kwargs={embedding: 8, hidden: 32}"])
    model = build_policy(config.sim, spec, 0)
    assert isinstance(model, CrossViewPolicy) and model.goal == "id" and model.policy_head.in_features == 32
    with pytest.raises(EnvSpecError, match="sim.policy='rollflow.envs.world_policy:Nope'"):
        build_policy(load_config(CROSSVIEW, ["sim.policy=rollflow.envs.world_policy:Nope"]).sim, spec, 0)
    with pytest.raises(ConfigError, match="could not be built .* unexpected keyword argument 'width'"):
        build_policy(load_config(CROSSVIEW, ["sim.policy_kwargs={width: 3}"]).sim, spec, 0)
    (tmp_path / "mine.py").write_text("class Table:\n    def __init__(self, *args, **kwargs):\n        pass\n")
    with pytest.raises(ConfigError, match="must build a torch.nn.Module .* it built a Table"):
        build_policy(load_config(CROSSVIEW, [f"sim.policy={tmp_path / 'mine.py'}:Table", "sim.policy_kwargs={}"]).sim,
                     spec, 0)
    for overrides, message in ((["sim.policy=resnet"], "give auto, mlp, cnn or a class of your own"),
                               (["sim.policy=cnn", "sim.policy_kwargs={a: 1}"], "sim.policy_kwargs are for a policy"),
                               (["sim.eval_sets={train/x: {}}"], "sim.eval_sets names ['train/x']")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(CROSSVIEW, overrides)
