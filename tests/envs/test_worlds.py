"""Cross-view worlds: synthesised tasks (deterministic, serialisable, many, split apart), the goal encodings, and the
three interactions' success and failure."""

import numpy as np
import pytest
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX

from rollflow.envs.worlds import (
    HELD_OUT_COMBOS,
    INTERACTIONS,
    MARK,
    SPLITS,
    CrossViewWorld,
    WorldObject,
    WorldTask,
    synthesize,
)

PICKUP, TOGGLE, LEFT, RIGHT, FORWARD = 3, 5, 0, 1, 2


def test_tasks_are_reproducible_serialisable_and_many():
    assert synthesize(7) == synthesize(7) and synthesize(7) != synthesize(8)
    task = synthesize(123, "unseen")
    assert WorldTask.from_json(task.to_json()) == task
    distinct = {synthesize(seed) for seed in range(10_000)}
    assert len(distinct) == 10_000
    assert {t.interaction for t in distinct} == set(INTERACTIONS)
    assert {t.difficulty for t in distinct} == {"easy", "medium", "hard"}


def test_unseen_worlds_share_no_family_size_or_object_appearance_with_training():
    train = [synthesize(s, "train") for s in range(500)]
    unseen = [synthesize(s, "unseen") for s in range(300)]
    for t in train:
        assert t.family in SPLITS["train"]["families"] and t.size in SPLITS["train"]["sizes"]
        assert not {(o.kind, o.color) for o in t.objects if o.kind != "door"} & HELD_OUT_COMBOS
    for t in unseen:
        assert t.family == "four_rooms" and t.size in (10, 11)
        assert {(o.kind, o.color) for o in t.objects if o.kind != "door"} <= HELD_OUT_COMBOS
    assert {t.interaction for t in unseen} == set(INTERACTIONS)


def test_the_goal_view_marks_the_target_as_seen_from_the_camera():
    for seed in range(40):
        env = CrossViewWorld()
        obs, info = env.reset(seed=seed)
        task = env.task
        goal = task.objects[task.target]
        goal_view, mask = obs[..., 3:6], obs[..., 6]
        assert (mask == MARK).sum() == 1
        x, y = np.argwhere(mask == MARK)[0]
        assert goal_view[x, y, 0] == OBJECT_TO_IDX[goal.kind] and goal_view[x, y, 1] == COLOR_TO_IDX[goal.color]
        interaction = obs[0, 0, 7:]
        assert list(interaction) == [MARK if i == task.interaction else 0 for i in INTERACTIONS]
        assert info["interaction"] == task.interaction and info["task_seed"] == task.seed
        assert task.camera[:2] != task.agent[:2]  # another viewpoint than the agent's


def test_the_task_id_encoding_names_type_colour_and_interaction():
    env = CrossViewWorld(goal="id")
    obs, _ = env.reset(seed=3)
    goal = env.task.objects[env.task.target]
    assert obs.shape == (7, 7, 16)
    types, colours, interaction = obs[0, 0, 3:7], obs[0, 0, 7:13], obs[0, 0, 13:]
    assert types.argmax() == ("ball", "box", "key", "door").index(goal.kind) and types.max() == MARK
    assert colours.argmax() == COLOR_TO_IDX[goal.color] and colours.sum() == MARK
    assert interaction.argmax() == INTERACTIONS.index(env.task.interaction)


def hand_task(interaction, target=0, agent=(2, 3, 0)):
    """A 7×7 room: a red ball right of the agent at (3, 3), a blue key at (2, 5), a closed green door in a wall at
    x = 4; the camera looks at the target from (1, 1)."""
    walls = tuple((4, y) for y in range(1, 6) if y != 3)
    objects = (WorldObject("ball", "red", 3, 3), WorldObject("key", "blue", 2, 5), WorldObject("door", "green", 4, 3))
    world = CrossViewWorld.from_parts(7, set(walls), list(objects))
    goal = objects[target]
    camera = next((x, y, d) for x in range(1, 4) for y in range(1, 6) for d in range(4)
                  if (x, y) not in {(3, 3), (2, 5), agent[:2]} and world.view_from((x, y, d), (goal.x, goal.y))[1])
    return WorldTask(0, "train", "split_v", 7, walls, objects, target, interaction, agent, camera, "easy")


def play(task, actions):
    env = CrossViewWorld()
    env.reset(options={"task": task})
    out = None
    for a in actions:
        out = env.step(a)
        if out[2] or out[3]:
            break
    return out


def test_picking_up_the_target_succeeds_and_anything_else_fails():
    _, reward, terminated, _, info = play(hand_task("pickup"), [PICKUP])
    assert terminated and info["success"] and 0.9 < reward < 1.0
    # the key is the target, the ball is picked up: the episode ends without reward
    _, reward, terminated, _, info = play(hand_task("pickup", target=1), [PICKUP])
    assert terminated and not info["success"] and reward == 0.0


def test_approach_succeeds_when_the_agent_faces_the_target():
    # the agent starts facing up; turning right makes it face the ball
    _, reward, terminated, _, info = play(hand_task("approach", agent=(2, 3, 3)), [RIGHT])
    assert terminated and info["success"] and reward > 0
    _, _, terminated, _, info = play(hand_task("approach", agent=(2, 3, 3)), [LEFT])
    assert not terminated and not info["success"]


def test_toggling_the_target_door_open_succeeds():
    # at (3, 4) facing up, the ball in front; the door is at (4, 3), right of the ball's cell
    task = hand_task("toggle", target=2, agent=(3, 4, 3))
    _, _, terminated, _, _ = play(task, [PICKUP])  # holding the ball is allowed in a toggle task
    assert not terminated
    _, reward, terminated, _, info = play(task, [PICKUP, FORWARD, RIGHT, TOGGLE])
    assert terminated and info["success"] and reward > 0


def test_an_unknown_split_goal_or_interaction_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        synthesize(0, "test")
    with pytest.raises(ValueError, match="goal must be"):
        CrossViewWorld(goal="text")
    with pytest.raises(ValueError, match="unknown interactions"):
        CrossViewWorld(interactions=["dance"])


@pytest.mark.parametrize("split", ["train", "unseen"])
def test_the_planner_solves_every_synthesised_task(split):
    from rollflow.envs.worlds import planner_action

    env = CrossViewWorld(split)
    outcomes = {}
    for seed in range(120):
        env.reset(seed=seed)
        for _ in range(env.max_steps):
            _, reward, terminated, truncated, info = env.step(planner_action(env))
            if terminated or truncated:
                break
        outcomes.setdefault(info["interaction"], []).append(info["success"] and reward > 0)
    assert set(outcomes) == set(INTERACTIONS) and all(all(v) for v in outcomes.values()), outcomes


def recorded_curriculum(solved):
    """A curriculum that saw 10 episodes of every task class, solved where ``solved(class)``."""
    from rollflow.envs.worlds import Curriculum

    curriculum = Curriculum(INTERACTIONS)
    for interaction, difficulty in curriculum.classes:
        for _ in range(10):
            task = WorldTask(0, "train", "room", 7, (), (), 0, interaction, (1, 1, 0), (2, 2, 0), difficulty)
            curriculum.record(task, solved((interaction, difficulty)))
    return curriculum


def test_the_curriculum_draws_the_task_classes_the_policy_fails_more_often():
    from rollflow.envs.worlds import Curriculum

    assert np.allclose(Curriculum(INTERACTIONS).weights(), 1 / 9)  # nothing recorded: every class alike
    curriculum = recorded_curriculum(lambda c: c[0] == "approach")  # every approach task solved, the rest failed
    weights = dict(zip(curriculum.classes, curriculum.weights()))
    assert weights[("approach", "easy")] == pytest.approx(weights[("pickup", "hard")] * 0.1 / 1.1)
    rng = np.random.default_rng(0)
    drawn = [curriculum.draw("train", rng) for _ in range(300)]
    assert sum(t.interaction == "approach" for t in drawn) < 0.1 * len(drawn)  # a third of tasks without it
    # only hard tasks failed: they are drawn most (without a curriculum about 9% of tasks are hard)
    curriculum = recorded_curriculum(lambda c: c[1] != "hard")
    drawn = [curriculum.draw("train", rng) for _ in range(300)]
    assert sum(t.difficulty == "hard" for t in drawn) > 0.5 * len(drawn)


def test_a_curriculum_environment_records_each_finished_episode():
    env = CrossViewWorld(curriculum=True)
    env.reset(seed=0)
    for target in (0, 1, 1):  # the ball is in front of the agent: picking it up succeeds once, fails twice
        env.reset(options={"task": hand_task("pickup", target=target)})
        assert env.step(PICKUP)[2]
    env.reset()  # a drawn task, then left before it ends: nothing is recorded for it
    env.step(LEFT)
    assert list(env.curriculum.outcomes[("pickup", "easy")]) == [True, False, False]
    assert sum(len(o) for o in env.curriculum.outcomes.values()) == 3


def test_the_gallery_script_draws_goal_views_and_trajectories(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "world_gallery.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "g.png"), "--tasks", "2", "--split", "train"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.stdout.count("success") == 2  # the planner solves both tasks it draws
