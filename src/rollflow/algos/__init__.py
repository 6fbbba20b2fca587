"""Pure, registered RL algorithm pieces: advantage estimators, policy and value losses, loss aggregation,
off-policy corrections, KL estimators, reward shaping and duration-aware weighting."""

from rollflow.algos import advantages, corrections, kl, losses, shaping  # noqa: F401  (registers the built-ins)
from rollflow.algos.advantages import signal_share
from rollflow.algos.corrections import needs_proximal, proximal
from rollflow.algos.duration import action_duration, duration_weights
from rollflow.algos.losses import TokenLoss, ValueLossFn, policy_loss_fn, sft_loss, value_loss, value_loss_fn
from rollflow.algos.registry import ADVANTAGES, AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES, Registry
from rollflow.algos.shaping import kl_penalty_rewards, overlong_penalty

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "CORRECTIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "Registry",
    "TokenLoss", "ValueLossFn",
    "action_duration", "duration_weights", "kl_penalty_rewards", "needs_proximal", "overlong_penalty",
    "policy_loss_fn", "proximal", "sft_loss", "signal_share", "value_loss", "value_loss_fn",
]
