"""Procedurally generated MiniGrid worlds with cross-view goals: one goal space for every task.

A **task** (``WorldTask``, a frozen dataclass: serialisable, hashable) is synthesised from a seed by ``synthesize``:
a layout family and size, closed doors, obstacles, 2–4 objects of several types and colours (the target and
distractors; the target's type-and-colour is unique in its world), an interaction type, the agent's start pose and
a *goal camera* pose from which the target is in view. ``CrossViewWorld`` (a ``gymnasium`` environment) draws a new
task at every reset from its own generator, so task generation runs wherever environments run: in the actor workers.

Interactions: ``approach`` (stand facing the target), ``pickup`` (hold it; picking up anything else fails the
episode) and ``toggle`` (open the target door). Success ends the episode with reward 1 − 0.9·steps/max_steps.

**Cross-view goal specification** (``goal="crossview"``): the policy is given, at every step, the egocentric view
the goal camera has of the world (7×7 cells: object, colour, state ids, as the agent's own view), a binary mask over
that view marking the target, and the interaction type: the same inputs, encoded by the same network, for every
task. ``goal="id"`` gives instead the target's type, colour and the interaction as one-hot planes (a task id, as a
"language" instruction would be), for the goal-space study. Observations are (7, 7, C) uint8 grids, channels:

    crossview: agent view (3) | goal view (3) | target mask (1) | interaction one-hot (3)          C = 10
    id:        agent view (3) | target type one-hot (4) | target colour one-hot (6) | interaction (3)  C = 16

Masks and one-hot planes hold ``MARK`` (10) for 1, on the scale of MiniGrid's ids, so one input scale fits all.

**Splits.** ``train`` worlds come from the families ``room``, ``split_v`` and ``split_h`` at sizes 7–9 and never
contain the held-out type–colour combinations; ``unseen`` worlds are ``four_rooms`` at sizes 10–11 whose objects are
all held-out combinations: layout family, size and the objects' appearance are never generated for training.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from minigrid.core.constants import COLOR_NAMES, COLOR_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Box, Door, Key, Wall
from minigrid.minigrid_env import MiniGridEnv

INTERACTIONS = ("approach", "pickup", "toggle")
OBJECT_TYPES = ("ball", "box", "key")
GOAL_TYPES = (*OBJECT_TYPES, "door")  # what a target can be
MARK = 10  # the value of a set mask cell or one-hot plane
VIEW = 7  # cells per side of every egocentric view
HELD_OUT_COMBOS = frozenset({("ball", "purple"), ("box", "green"), ("key", "yellow"), ("ball", "grey"),
                             ("box", "red"), ("key", "blue")})
SPLITS: dict[str, dict[str, Any]] = {
    "train": {"families": ("room", "split_v", "split_h"), "sizes": (7, 8, 9)},
    "unseen": {"families": ("four_rooms",), "sizes": (10, 11)},
}
_OBJECTS = {"ball": Ball, "box": Box, "key": Key}


@dataclass(frozen=True)
class WorldObject:
    kind: str  # ball | box | key | door
    color: str
    x: int
    y: int


@dataclass(frozen=True)
class WorldTask:
    """One task: everything needed to rebuild its world exactly (``CrossViewWorld.load``). ``target`` indexes
    ``objects``; doors are objects too (closed, not locked). ``walls``: interior wall cells (room dividers and
    obstacles); the outer wall is implied by ``size``."""

    seed: int
    split: str
    family: str
    size: int
    walls: tuple[tuple[int, int], ...]
    objects: tuple[WorldObject, ...]
    target: int
    interaction: str
    agent: tuple[int, int, int]  # x, y, direction
    camera: tuple[int, int, int]  # the goal view's pose
    difficulty: str  # easy | medium | hard, from the agent's shortest path to the target

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorldTask:
        d = json.loads(text)
        return cls(**{**d, "walls": tuple(map(tuple, d["walls"])), "objects": tuple(WorldObject(**o) for o in d["objects"]),
                      "agent": tuple(d["agent"]), "camera": tuple(d["camera"])})


# -- synthesis ----------------------------------------------------------------------------------------------------------
def _layout(family: str, size: int, rng: np.random.Generator) -> tuple[set[tuple[int, int]], list[tuple[int, int]]]:
    """Interior wall cells and door cells of a layout (the outer wall excluded): one room; two rooms split by a
    vertical or a horizontal wall with a door; four rooms (both walls, a door in each of the four wall halves);
    then up to two single-block obstacles."""
    walls: set[tuple[int, int]] = set()
    doors: list[tuple[int, int]] = []
    inner = range(1, size - 1)
    vx = int(rng.integers(3, size - 3)) if family in ("split_v", "four_rooms") else None
    hy = int(rng.integers(3, size - 3)) if family in ("split_h", "four_rooms") else None
    if vx is not None:
        walls |= {(vx, y) for y in inner}
        spans = [range(1, hy), range(hy + 1, size - 1)] if hy is not None else [inner]
        doors += [(vx, int(rng.choice(list(span)))) for span in spans]
    if hy is not None:
        walls |= {(x, hy) for x in inner}
        spans = [range(1, vx), range(vx + 1, size - 1)] if vx is not None else [inner]
        doors += [(int(rng.choice(list(span))), hy) for span in spans]
    for _ in range(int(rng.integers(0, 3))):
        walls.add((int(rng.integers(1, size - 1)), int(rng.integers(1, size - 1))))
    walls -= set(doors)
    return walls, doors


def _neighbours(x: int, y: int) -> list[tuple[int, int]]:
    return [(x + dx, y + dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]


def _distances(size: int, blocked: set[tuple[int, int]], start: tuple[int, int]) -> dict[tuple[int, int], int]:
    """BFS steps from ``start`` over cells not ``blocked`` (closed doors are passable: the agent can open them)."""
    dist = {start: 0}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for n in _neighbours(*cell):
            if n not in dist and n not in blocked and 0 < n[0] < size - 1 and 0 < n[1] < size - 1:
                dist[n] = dist[cell] + 1
                queue.append(n)
    return dist


def _combos(split: str) -> list[tuple[str, str]]:
    every = [(t, c) for t in OBJECT_TYPES for c in COLOR_NAMES]
    return [p for p in every if (p in HELD_OUT_COMBOS) == (split == "unseen")]


def synthesize(seed: int, split: Literal["train", "unseen"] = "train", interaction: str | None = None,
               family: str | None = None, size: int | None = None) -> WorldTask:
    """The task of ``seed`` in ``split`` (the same seed always gives the same task). ``interaction``, ``family`` and
    ``size`` pin those choices (they must belong to the split); otherwise they are drawn."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for _ in range(100):  # a draw that cannot be completed (no room, no view of the target) is drawn again
        task = _attempt(seed, split, rng, interaction, family, size)
        if task is not None:
            return task
    raise RuntimeError(f"could not synthesise a task for seed {seed} in split {split!r}")


def _attempt(seed: int, split: str, rng: np.random.Generator, interaction: str | None, family: str | None,
             size: int | None) -> WorldTask | None:
    spec = SPLITS[split]
    family = family or str(rng.choice(spec["families"]))
    size = size or int(rng.choice(spec["sizes"]))
    if family not in spec["families"] or size not in spec["sizes"]:
        raise ValueError(f"family {family!r} at size {size} is not in split {split!r} ({spec})")
    walls, door_cells = _layout(family, size, rng)
    doors = [WorldObject("door", str(rng.choice(COLOR_NAMES)), x, y) for x, y in door_cells]
    kinds = [i for i in INTERACTIONS if i != "toggle" or doors]
    chosen = interaction or str(rng.choice(kinds))
    if chosen not in kinds:
        return None  # toggle needs a door: draw another layout
    # free floor: not a wall, not a door, not beside a door (an object there could block the way through)
    beside_doors = {n for d in door_cells for n in _neighbours(*d)}
    free = [(x, y) for x in range(1, size - 1) for y in range(1, size - 1)
            if (x, y) not in walls and (x, y) not in door_cells and (x, y) not in beside_doors]
    n_objects = int(rng.integers(2, 5))
    if len(free) < n_objects + 2:
        return None
    cells = [free[i] for i in rng.permutation(len(free))[: n_objects + 1]]
    agent_cell, object_cells = cells[0], cells[1:]
    combos = _combos(split)
    picked = [combos[i] for i in rng.permutation(len(combos))[:n_objects]]  # distinct type-colour pairs
    objects = [WorldObject(t, c, x, y) for (t, c), (x, y) in zip(picked, object_cells)]
    everything = objects + doors
    target = len(objects) + int(rng.integers(len(doors))) if chosen == "toggle" else int(rng.integers(len(objects)))
    goal = everything[target]
    if chosen == "toggle" and any(d.color == goal.color for i, d in enumerate(doors) if len(objects) + i != target):
        return None  # the target door's colour must name it
    blocked = walls | {(o.x, o.y) for o in objects}
    dist = _distances(size, blocked, agent_cell)
    reach = [dist[n] for n in _neighbours(goal.x, goal.y) if n in dist]
    if not reach:
        return None  # the target cannot be reached
    steps = min(reach)
    difficulty = "easy" if steps <= 3 else "medium" if steps <= 7 else "hard"
    world = CrossViewWorld.from_parts(size, walls, everything)
    camera = _camera(world, (goal.x, goal.y), agent_cell, rng, blocked | set(door_cells))
    if camera is None:
        return None
    return WorldTask(seed, split, family, size, tuple(sorted(walls)), tuple(everything), target, chosen,
                     (*agent_cell, int(rng.integers(4))), camera, difficulty)


def _camera(world: CrossViewWorld, target: tuple[int, int], agent: tuple[int, int], rng: np.random.Generator,
            blocked: set[tuple[int, int]]) -> tuple[int, int, int] | None:
    """A pose on free floor, not the agent's start, from which ``target`` is visible (in view, not occluded)."""
    size = world.width
    poses = [(x, y, d) for x in range(1, size - 1) for y in range(1, size - 1) for d in range(4)
             if (x, y) not in blocked and (x, y) != agent and (x, y) != target]
    for i in rng.permutation(len(poses)):
        pose = poses[i]
        if world.view_from(pose, target)[1] is not None:
            return pose
    return None


# -- the environment ----------------------------------------------------------------------------------------------------
class CrossViewWorld(MiniGridEnv):
    """A gymnasium environment over synthesised ``WorldTask``s (see the module docstring). Each reset draws the task
    of a new seed from the environment's generator (``reset(seed=)`` seeds it), or plays ``options={"task": task}``.
    ``interactions`` restricts the interaction types drawn; ``curriculum`` draws them by recent success instead
    (``Curriculum``). ``info`` carries the task's interaction, difficulty, family and seed, and ``success``."""

    def __init__(self, split: Literal["train", "unseen"] = "train", goal: Literal["crossview", "id"] = "crossview",
                 interactions: tuple[str, ...] | list[str] | None = None, max_steps_per_cell: int = 5,
                 curriculum: bool = False, curriculum_window: int = 50) -> None:
        if goal not in ("crossview", "id"):
            raise ValueError(f"goal must be 'crossview' or 'id', got {goal!r}")
        bad = set(interactions or ()) - set(INTERACTIONS)
        if bad:
            raise ValueError(f"unknown interactions {sorted(bad)}; choose from {INTERACTIONS}")
        self.split, self.goal = split, goal
        self.interactions = tuple(interactions) if interactions else INTERACTIONS
        self.max_steps_per_cell = max_steps_per_cell
        self.curriculum = Curriculum(self.interactions, curriculum_window) if curriculum else None
        largest = max(SPLITS[split]["sizes"])
        super().__init__(MissionSpace(mission_func=lambda: "reach the goal"), width=largest, height=largest,
                         max_steps=max_steps_per_cell * largest * largest, see_through_walls=False)
        channels = 10 if goal == "crossview" else 16
        self.observation_space = gym.spaces.Box(0, 255, (VIEW, VIEW, channels), np.uint8)
        self.task: WorldTask | None = None
        self._goal_planes: np.ndarray | None = None

    @classmethod
    def from_parts(cls, size: int, walls: set[tuple[int, int]], objects: list[WorldObject]) -> CrossViewWorld:
        """A bare world (no task, no agent) for looking at it from a pose: used while synthesising."""
        world = cls.__new__(cls)
        world.width = world.height = size
        world.agent_view_size, world.see_through_walls, world.carrying = VIEW, False, None
        world.grid = _grid(size, walls, objects)
        return world

    def view_from(self, pose: tuple[int, int, int], target: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int] | None]:
        """The encoded egocentric view (7, 7, 3) from ``pose`` and where ``target`` is in it (None: not visible)."""
        saved = (getattr(self, "agent_pos", None), getattr(self, "agent_dir", None), self.carrying)
        self.agent_pos, self.agent_dir, self.carrying = (pose[0], pose[1]), pose[2], None
        try:
            grid, vis = self.gen_obs_grid()
            where = self.relative_coords(*target)
            if where is not None and not vis[where[0], where[1]]:
                where = None
            return grid.encode(vis), where
        finally:
            self.agent_pos, self.agent_dir, self.carrying = saved

    # MiniGridEnv calls this from reset; the task decides everything.
    def _gen_grid(self, width: int, height: int) -> None:
        task = self.task
        assert task is not None
        self.width = self.height = task.size
        self.grid = _grid(task.size, set(task.walls), list(task.objects))
        self.agent_pos, self.agent_dir = (task.agent[0], task.agent[1]), task.agent[2]
        goal = task.objects[task.target]
        self._target = self.grid.get(goal.x, goal.y)
        self.max_steps = self.max_steps_per_cell * task.size * task.size
        self.mission = f"{task.interaction} the {task.objects[task.target].color} {task.objects[task.target].kind}"

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        gym.Env.reset(self, seed=seed)
        task = (options or {}).get("task")
        if task is None and self.curriculum is not None:
            task = self.curriculum.draw(self.split, self.np_random)
        elif task is None:
            task = synthesize(int(self.np_random.integers(2**31)), self.split,
                              interaction=str(self.np_random.choice(self.interactions)))
        self.task = task
        self.carrying, self.step_count = None, 0
        self._gen_grid(task.size, task.size)
        self._goal_planes = self._encode_goal(task)
        return self._observation(), self._info(False)

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        task = self.task
        assert task is not None
        target = self._target  # the object itself: it keeps its identity when carried
        carried_before = self.carrying
        _, _, _, truncated, _ = super().step(action)
        success = failure = False
        if task.interaction == "approach":
            front = self.grid.get(*self.front_pos) if self._inside(self.front_pos) else None
            success = front is target
        elif task.interaction == "pickup":
            if self.carrying is not None and carried_before is None:
                success, failure = self.carrying is target, self.carrying is not target
        else:  # toggle
            success = bool(target.is_open)
        reward = 1.0 - 0.9 * self.step_count / self.max_steps if success else 0.0
        terminated = success or failure
        if (terminated or truncated) and self.curriculum is not None:
            self.curriculum.record(task, success)
        return self._observation(), reward, terminated, truncated and not terminated, self._info(success)

    # -- observations ---------------------------------------------------------------------------------------------------
    def _observation(self) -> np.ndarray:
        view = self.gen_obs()["image"]  # (7, 7, 3)
        return np.concatenate([view, self._goal_planes], axis=-1).astype(np.uint8)

    def _encode_goal(self, task: WorldTask) -> np.ndarray:
        goal = task.objects[task.target]
        interaction = _planes(INTERACTIONS.index(task.interaction), len(INTERACTIONS))
        if self.goal == "id":
            return np.concatenate([_planes(GOAL_TYPES.index(goal.kind), len(GOAL_TYPES)),
                                   _planes(COLOR_TO_IDX[goal.color], len(COLOR_TO_IDX)), interaction], axis=-1)
        view, where = self.view_from(task.camera, (goal.x, goal.y))
        if where is None:
            raise RuntimeError(f"task {task.seed}: the goal camera does not see the target")
        mask = np.zeros((VIEW, VIEW, 1), np.uint8)
        mask[where[0], where[1], 0] = MARK
        return np.concatenate([view, mask, interaction], axis=-1)

    def _inside(self, pos: Any) -> bool:
        return 0 <= pos[0] < self.width and 0 <= pos[1] < self.height

    def _info(self, success: bool) -> dict[str, Any]:
        task = self.task
        assert task is not None
        return {"success": success, "interaction": task.interaction, "difficulty": task.difficulty,
                "family": task.family, "task_seed": task.seed}


def _planes(index: int, n: int) -> np.ndarray:
    planes = np.zeros((VIEW, VIEW, n), np.uint8)
    planes[..., index] = MARK
    return planes


def _grid(size: int, walls: set[tuple[int, int]], objects: list[WorldObject]) -> Grid:
    grid = Grid(size, size)
    grid.wall_rect(0, 0, size, size)
    for x, y in walls:
        grid.set(x, y, Wall())
    for o in objects:
        grid.set(o.x, o.y, Door(o.color, is_open=False, is_locked=False) if o.kind == "door" else _OBJECTS[o.kind](o.color))
    return grid




class Curriculum:
    """Draws tasks by recent success: a task class (interaction × difficulty) is drawn with weight 1 − its success
    rate over its last ``window`` episodes (+0.1, so none is starved; a class with fewer than 5 episodes weighs 1),
    then seeds are drawn until one synthesises a task of that class (at most 30; the last one otherwise). Each
    environment keeps its own record, so it runs wherever the environment does."""

    DIFFICULTIES = ("easy", "medium", "hard")

    def __init__(self, interactions: tuple[str, ...], window: int = 50) -> None:
        self.classes = [(i, d) for i in interactions for d in self.DIFFICULTIES]
        self.outcomes: dict[tuple[str, str], deque[bool]] = {c: deque(maxlen=window) for c in self.classes}

    def weights(self) -> np.ndarray:
        w = [1.0 if len(o) < 5 else 1.0 - sum(o) / len(o) + 0.1 for o in self.outcomes.values()]
        return np.asarray(w) / sum(w)

    def draw(self, split: str, rng: np.random.Generator) -> WorldTask:
        interaction, difficulty = self.classes[int(rng.choice(len(self.classes), p=self.weights()))]
        for _ in range(30):
            task = synthesize(int(rng.integers(2**31)), split, interaction=interaction)
            if task.difficulty == difficulty:
                break
        return task

    def record(self, task: WorldTask, success: bool) -> None:
        self.outcomes[(task.interaction, task.difficulty)].append(success)


# -- the scripted planner (demonstrations for behaviour cloning) --------------------------------------------------------
LEFT, RIGHT, FORWARD, PICKUP, TOGGLE = 0, 1, 2, 3, 5  # MiniGrid's action ids
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # right, down, left, up: MiniGrid's directions 0..3


def planner_action(env: CrossViewWorld) -> int:
    """The shortest-path bot's next action in ``env``'s current state: walk the shortest path of cells to one beside
    the target (closed doors on the way are opened: passable at the cost of a toggle), turn to face the target, then
    pick it up / toggle it (approach is done once facing it). Re-planned every step from the state, so it also
    recovers from states another policy left it in. Carrying a wrong object never happens to it (it picks up only
    the target)."""
    task = env.task
    assert task is not None
    size = env.width
    if env.carrying is not None and env.carrying is env._target:
        return FORWARD  # already done (a pickup ends the episode); any action
    goal = _position(env, env._target)
    x, y, d = int(env.agent_pos[0]), int(env.agent_pos[1]), int(env.agent_dir)
    front = (x + _DIRS[d][0], y + _DIRS[d][1])
    if front == goal:
        return {"pickup": PICKUP, "toggle": TOGGLE}.get(task.interaction, RIGHT)
    # cells the agent cannot enter: walls, objects (not open doors); closed doors are entered after a toggle
    blocked = set()
    for i in range(size):
        for j in range(size):
            cell = env.grid.get(i, j)
            if cell is not None and cell.type != "door":
                blocked.add((i, j))
    targets = {n for n in _neighbours(*goal) if n not in blocked and 0 < n[0] < size - 1 and 0 < n[1] < size - 1}
    if (x, y) in targets:  # beside the target: turn toward it
        return _turn(d, (goal[0] - x, goal[1] - y))
    path = _path(size, blocked, (x, y), targets)
    if path is None:
        return RIGHT  # nothing reachable (cannot happen for synthesised tasks): look around
    step = (path[1][0] - x, path[1][1] - y)
    if _DIRS[d] != step:
        return _turn(d, step)
    ahead = env.grid.get(*path[1])
    if ahead is not None and ahead.type == "door" and not ahead.is_open:
        return TOGGLE
    return FORWARD


def _position(env: CrossViewWorld, obj: Any) -> tuple[int, int]:
    pos = getattr(obj, "cur_pos", None)
    if pos is not None and pos[0] >= 0:
        return int(pos[0]), int(pos[1])
    goal = env.task.objects[env.task.target]
    return goal.x, goal.y


def _turn(d: int, want: tuple[int, int]) -> int:
    target = _DIRS.index(want)
    return RIGHT if (target - d) % 4 in (1, 2) else LEFT


def _path(size: int, blocked: set[tuple[int, int]], start: tuple[int, int],
          goals: set[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The shortest cell path from ``start`` to any of ``goals`` (BFS), both ends included."""
    before: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell in goals:
            path = [cell]
            while before[path[-1]] is not None:
                path.append(before[path[-1]])
            return path[::-1]
        for n in _neighbours(*cell):
            if n not in before and n not in blocked and 0 < n[0] < size - 1 and 0 < n[1] < size - 1:
                before[n] = cell
                queue.append(n)
    return None


__all__ = ["HELD_OUT_COMBOS", "INTERACTIONS", "SPLITS", "CrossViewWorld", "Curriculum", "WorldObject", "WorldTask", "planner_action",
           "synthesize"]
