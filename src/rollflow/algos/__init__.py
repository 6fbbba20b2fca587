"""Pure, registered RL algorithm pieces: advantage estimators, policy losses, loss aggregation."""

from rollflow.algos import advantages, losses  # noqa: F401  (registers the built-ins)
from rollflow.algos.losses import policy_loss_fn, sft_loss
from rollflow.algos.registry import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, Registry

__all__ = ["ADVANTAGES", "AGGREGATIONS", "POLICY_LOSSES", "Registry", "policy_loss_fn", "sft_loss"]
