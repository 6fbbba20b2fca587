"""Pure, registered RL algorithm pieces: advantage estimators, policy losses, loss aggregation,
off-policy corrections."""

from rollflow.algos import advantages, corrections, losses  # noqa: F401  (registers the built-ins)
from rollflow.algos.losses import policy_loss_fn, sft_loss
from rollflow.algos.corrections import needs_proximal
from rollflow.algos.registry import ADVANTAGES, AGGREGATIONS, CORRECTIONS, POLICY_LOSSES, Registry

__all__ = ["ADVANTAGES", "AGGREGATIONS", "CORRECTIONS", "POLICY_LOSSES", "Registry", "needs_proximal", "policy_loss_fn", "sft_loss"]
