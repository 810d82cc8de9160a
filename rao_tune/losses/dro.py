"""DRO, the offline single-trajectory baseline with a learned value network (RAO paper, Table 2)."""

from __future__ import annotations

from rao_tune.losses import functional as LF
from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs, require


class DROLoss(PreferenceLoss):
    """Direct Reward Optimisation, DRO-V (Richemond et al. 2024, "Offline regularised reinforcement learning for
    LLM alignment", Eq. 9):

        L(theta, V) = 1/2 * E_(x, y, r) (r(x, y) - V(x) - tau * log(pi_theta/pi_ref)(y|x))^2

    Where RAO derives the normaliser from prefix consistency and reward partitioning estimates it from a
    prompt's responses, DRO learns it: ``V(x)`` comes from a value network trained jointly with the policy
    (``value_model`` / ``value_checkpointer`` / ``value_lr`` in the recipe's config, checkpointed with it). The
    recipe fills ``batch.values``. The implicit reward is ``tau * log(pi/pi_ref)(y|x) + V(x)``.

    Args:
        tau: the KL-regularisation strength (the paper's tau; beta in RLHF's Eq. 3).
    """

    needs_value_model = True

    def __init__(self, tau: float = 1.0):
        super().__init__()
        require(self, tau > 0, f"tau must be > 0, got {tau}")
        self.tau = float(tau)

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        if batch.values is None:
            raise ValueError("DROLoss needs V(x): the recipe must run a value model (value_model in the config)")
        loss = LF.dro_loss(batch.policy_logps, batch.reference_logps, batch.values, batch.rewards, batch.prompt_ids,
                           tau=self.tau)
        implicit_rewards = self.tau * (batch.policy_logps - batch.reference_logps) + batch.values
        return LossOutput(loss=loss, implicit_rewards=implicit_rewards.detach())
