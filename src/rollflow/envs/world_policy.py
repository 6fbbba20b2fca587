"""The actor-critic for ``CrossViewWorld``: one network that reads every task's goal the same way.

A grid cell (object, colour, state ids) is embedded as the sum of three learned embeddings, one table each, shared
by the agent's view and the goal view. The goal yields a **target descriptor** in that cell space and a context:

- ``crossview`` goals: the descriptor is the embedding of the masked cell of the goal view (the mask pools the goal
  view's cells), the context a small convolution over the goal view and its mask (what surrounds the target);
- ``id`` goals: the descriptor and the context are learned projections of the type and colour one-hot planes (a task
  id carries no picture).

The agent's view then enters its convolution as each cell's embedding beside its elementwise product with the
descriptor (a cell that matches the target lights up the same way whatever the target is), and the trunk sees the
convolution's features, the context and the interaction type. The layout is read from the observation's channels:
10 (crossview) or 16 (id), as ``CrossViewWorld`` makes them.

Used as ``sim.policy: rollflow.envs.world_policy:CrossViewPolicy`` (``sim.policy_kwargs`` for the sizes).
"""

from __future__ import annotations

import torch
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

from rollflow.engines.policy import RunningNorm
from rollflow.envs.worlds import GOAL_TYPES, INTERACTIONS, MARK

_LAYOUTS = {10: "crossview", 16: "id"}


class CrossViewPolicy(torch.nn.Module):
    def __init__(self, obs_shape: tuple[int, ...], actions: int, seed: int = 0, normalize_rewards: bool = False,
                 embedding: int = 16, channels: tuple[int, ...] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        if len(obs_shape) != 3 or obs_shape[-1] not in _LAYOUTS:
            raise ValueError(f"CrossViewPolicy reads CrossViewWorld observations (7, 7, 10) or (7, 7, 16), one frame; "
                             f"got {tuple(obs_shape)} (sim.frame_stack must be 1)")
        height, width, depth = obs_shape
        self.goal = _LAYOUTS[depth]
        self.return_norm = RunningNorm(()) if normalize_rewards else None
        e = embedding
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.objects = torch.nn.Embedding(len(OBJECT_TO_IDX), e)
            self.colours = torch.nn.Embedding(len(COLOR_TO_IDX), e)
            self.states = torch.nn.Embedding(len(STATE_TO_IDX), e)
            if self.goal == "crossview":
                self.context = torch.nn.Sequential(torch.nn.Conv2d(e + 1, 16, 2), torch.nn.ReLU(), torch.nn.Flatten(),
                                                   torch.nn.Linear(16 * (height - 1) * (width - 1), e), torch.nn.ReLU())
            else:
                ids = len(GOAL_TYPES) + len(COLOR_TO_IDX)
                self.descriptor = torch.nn.Linear(ids, e)
                self.context = torch.nn.Sequential(torch.nn.Linear(ids, e), torch.nn.ReLU())
            layers: list[torch.nn.Module] = []
            for c_in, c_out in zip((2 * e, *channels), channels):
                layers += [torch.nn.Conv2d(c_in, c_out, 2), torch.nn.ReLU()]
            self.conv = torch.nn.Sequential(*layers, torch.nn.Flatten())
            with torch.no_grad():
                flat = self.conv(torch.zeros(1, 2 * e, height, width)).shape[1]
            self.trunk = torch.nn.Sequential(torch.nn.Linear(flat + e + len(INTERACTIONS), hidden), torch.nn.ReLU())
            self.policy_head = torch.nn.Linear(hidden, actions)
            self.value_head = torch.nn.Linear(hidden, 1)

    def _cells(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) integer ids → (B, H, W, E)."""
        return self.objects(ids[..., 0]) + self.colours(ids[..., 1]) + self.states(ids[..., 2])

    def _features(self, observations: torch.Tensor) -> torch.Tensor:
        x = observations.long()
        view = self._cells(x[..., :3])  # (B, H, W, E)
        if self.goal == "crossview":
            goal_view = self._cells(x[..., 3:6])
            mask = (x[..., 6:7] == MARK).float()  # (B, H, W, 1)
            descriptor = (goal_view * mask).sum((1, 2))  # (B, E): the masked cell
            context = self.context(torch.cat([goal_view, mask], -1).permute(0, 3, 1, 2))
            interaction = x[:, 0, 0, 7:10].float() / MARK
        else:
            ids = x[:, 0, 0, 3:13].float() / MARK  # type | colour one-hots
            descriptor, context = self.descriptor(ids), self.context(ids)
            interaction = x[:, 0, 0, 13:16].float() / MARK
        cells = torch.cat([view, view * descriptor[:, None, None, :]], -1)  # (B, H, W, 2E)
        features = self.conv(cells.permute(0, 3, 1, 2))
        return self.trunk(torch.cat([features, context, interaction], -1))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy_head(self._features(observations))  # (B, actions)

    def value(self, observations: torch.Tensor) -> torch.Tensor:
        return self.value_head(self._features(observations)).squeeze(-1)  # (B,)
