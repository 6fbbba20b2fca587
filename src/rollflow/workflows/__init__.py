"""Rollout workflows: how a task instance becomes a trajectory. A new kind of rollout is a new module here (or in
the user's own code); it implements ``api.RolloutWorkflow`` and touches no runtime file."""

from rollflow.workflows.agent import AgentLoop
from rollflow.workflows.gym import GymFragments
from rollflow.workflows.text import SingleTurn, Tokens
from rollflow.workflows.vector import VectorFragments

__all__ = ["AgentLoop", "GymFragments", "SingleTurn", "Tokens", "VectorFragments"]
