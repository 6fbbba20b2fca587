"""Simulator environments (``gymnasium.Env``) for non-text agents. Each is constructible directly and registered
with gymnasium on import, so ``gymnasium.make("rollflow/Corridor-v0", n=8)`` works too."""

import gymnasium

from rollflow.envs.corridor import Corridor

CORRIDOR = "rollflow/Corridor-v0"

if CORRIDOR not in gymnasium.registry:  # gymnasium warns when an id is registered twice
    gymnasium.register(CORRIDOR, entry_point="rollflow.envs.corridor:Corridor")

__all__ = ["CORRIDOR", "Corridor"]
