"""Point-wise losses over every response of a prompt, RAO's siblings (RAO itself is in :mod:`rao_tune.losses.rao`)."""

from __future__ import annotations

from typing import Sequence

from rao_tune.losses import functional as LF
from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs, require
from rao_tune.losses.pairs import require_pairs


class RLOOLoss(PreferenceLoss):
    """Offline REINFORCE leave-one-out on the dataset's rewards: see :func:`functional.rloo_loss`.
    Reference-free; the implicit reward reported is the sequence log-likelihood."""

    needs_reference = False

    def check_data(self, prompt_rewards: Sequence[Sequence[float]]) -> None:
        # A lone or tied response has no advantage over its leave-one-out baseline: no gradient.
        require_pairs(type(self).__name__, prompt_rewards)

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        loss = LF.rloo_loss(batch.policy_logps, batch.rewards, batch.prompt_ids)
        return LossOutput(loss=loss, implicit_rewards=batch.policy_logps.detach())


class RewardPartitionLoss(PreferenceLoss):
    """Reward Partitioning Optimization (Faye et al. 2025): see :func:`functional.reward_partition_loss`.

    Args:
        tau: the KL temperature (the authors' default 0.7; their script uses 5.0).
        average_log_probs: token-averaged log-probs, as the authors' implementation (default); False uses sums.
    The implicit reward ``tau * log pi/pi_ref + V(x)`` is the reward the policy encodes under this normaliser.
    """

    def __init__(self, tau: float = 0.7, average_log_probs: bool = True):
        super().__init__()
        require(self, tau > 0, f"tau must be > 0, got {tau}")
        self.tau, self.average_log_probs = tau, average_log_probs

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        policy_logps, reference_logps = batch.policy_logps, batch.reference_logps
        if self.average_log_probs:
            policy_logps, reference_logps = policy_logps / batch.response_lengths, reference_logps / batch.response_lengths
        loss = LF.reward_partition_loss(policy_logps, reference_logps, batch.rewards, batch.prompt_ids, tau=self.tau)
        normaliser = LF.partition_log_normaliser(reference_logps, batch.rewards, batch.prompt_ids, tau=self.tau)
        implicit_rewards = self.tau * (policy_logps - reference_logps + normaliser)
        return LossOutput(loss=loss, implicit_rewards=implicit_rewards.detach())
