"""A picture of cross-view tasks: for each, the goal as the policy gets it (the goal camera's view with the target's
cell outlined by its mask, and the interaction) beside the world seen from above with the agent's trajectory.

    python scripts/world_gallery.py OUT.png [--policy RUN_DIR/model/policy.pt] [--split unseen] [--tasks 6]
                                    [--seed 1000000000] [--greedy]

Without ``--policy`` the trajectories are the shortest-path planner's. With one, they are the policy's (sampled
actions unless ``--greedy``), and each panel says whether it succeeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from minigrid.core.grid import Grid

from rollflow.config import Config
from rollflow.envs.simulator import env_spec
from rollflow.envs.worlds import MARK, VIEW, CrossViewWorld, planner_action
from rollflow.recipes.sim import build_policy

TILE = 24


def goal_picture(obs: np.ndarray) -> np.ndarray:
    """The goal camera's egocentric view (rendered as MiniGrid renders an agent's view) with the masked cell
    outlined in magenta."""
    grid, vis = Grid.decode(obs[..., 3:6])
    image = grid.render(TILE, agent_pos=(VIEW // 2, VIEW - 1), agent_dir=3, highlight_mask=~vis)
    i, j = np.argwhere(obs[..., 6] == MARK)[0]
    x0, y0 = i * TILE, j * TILE
    image[y0:y0 + TILE, x0:x0 + 2] = image[y0:y0 + TILE, x0 + TILE - 2:x0 + TILE] = (255, 0, 255)
    image[y0:y0 + 2, x0:x0 + TILE] = image[y0 + TILE - 2:y0 + TILE, x0:x0 + TILE] = (255, 0, 255)
    return image


def play(env: CrossViewWorld, seed: int, act) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], bool]:
    obs, _ = env.reset(seed=seed)
    start = env.get_full_render(highlight=False, tile_size=TILE)
    path = [tuple(int(v) for v in env.agent_pos)]
    success = False
    for _ in range(env.max_steps):
        obs_next, _, terminated, truncated, info = env.step(act(env, obs))
        path.append(tuple(int(v) for v in env.agent_pos))
        obs, success = obs_next, info["success"]
        if terminated or truncated:
            break
    return start, goal_picture(env.reset(seed=seed)[0]), path, success


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--policy", default=None)
    parser.add_argument("--split", default="unseen", choices=["train", "unseen"])
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1_000_000_000)
    parser.add_argument("--greedy", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.policy:
        saved = torch.load(args.policy, weights_only=False)
        sim = Config.model_validate(saved["config"]).sim
        model = build_policy(sim, env_spec(sim.env, sim.env_kwargs, sim.frame_stack), 0)
        model.load_state_dict(saved["state_dict"])

        @torch.no_grad()
        def act(env, obs):
            logits = model(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
            return int(logits.argmax()) if args.greedy else int(torch.multinomial(logits.softmax(-1), 1))
    else:
        def act(env, obs):
            return planner_action(env)

    env = CrossViewWorld(split=args.split)
    fig, axes = plt.subplots(args.tasks // 2, 4, figsize=(13, 3.3 * (args.tasks // 2)),
                             gridspec_kw={"width_ratios": [1, 1.5, 1, 1.5]})
    for k, ax_pair in enumerate(axes.reshape(-1, 2)):
        start, goal, path, success = play(env, args.seed + k, act)
        task = env.task
        target = task.objects[task.target]
        print(f"task {task.seed} ({task.family} {task.size}, {task.interaction} the {target.color} {target.kind}): "
              f"{'success' if success else 'failed'} in {len(path) - 1} steps")
        ax_pair[0].imshow(goal)
        ax_pair[0].set_title(f"goal: {task.interaction}\n(cross-view, mask in magenta)", fontsize=9)
        ax_pair[1].imshow(start)
        xs = [(p[0] + 0.5) * TILE for p in path]
        ys = [(p[1] + 0.5) * TILE for p in path]
        ax_pair[1].plot(xs, ys, color="cyan", linewidth=2, alpha=0.8)
        ax_pair[1].plot(xs[:1], ys[:1], "o", color="cyan")
        cam = task.camera
        ax_pair[1].plot([(cam[0] + 0.5) * TILE], [(cam[1] + 0.5) * TILE], "s", color="orange", markersize=7)
        who = "policy" if args.policy else "planner"
        ax_pair[1].set_title(f"{task.family} {task.size}×{task.size}: {target.color} {target.kind}, "
                             f"{task.difficulty}\n{who}: {len(path) - 1} steps, "
                             f"{'success' if success else 'failed'}", fontsize=9)
        for ax in ax_pair:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"cross-view tasks in {args.split} worlds (orange square: goal camera; cyan: trajectory)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
