"""Losses over every response of a prompt, RAO's siblings (RAO itself is in :mod:`rao_tune.losses.rao`): point-wise
regressions (QRPO, reward partitioning), REBEL's regression on pair differences, offline RLOO."""

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


class QRPOLoss(PreferenceLoss):
    """Quantile Reward Policy Optimization (Matrenok et al. 2025): see :func:`functional.qrpo_loss`.

        q(x, y) = mean_{y' of x} 1[r(x, y') <= r(x, y)],   log Z_q(k) = log mean_{j=1..k} e^(j / (k beta))
        L = mean_x mean_{y of x} (q(x, y) - beta * log Z_q(k) - beta * log(pi/pi_ref)(y|x))^2

    (k responses; as k grows log Z_q(k) -> log(beta (e^(1/beta) - 1)), the paper's continuous normaliser.)

    Args:
        beta: KL strength (the authors' grid for 8B models: 3e-4, 1e-3, 3e-3).
    Only the rewards' order within a prompt matters, so their scale needs no standardisation. The quantile
    assumes the prompt's responses were sampled from the reference (the authors use reference samples' rewards).
    The implicit reward is the quantile the policy encodes, ``beta * log(pi/pi_ref) + beta * log Z_q``.
    """

    def __init__(self, beta: float = 1e-3):
        super().__init__()
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        loss = LF.qrpo_loss(batch.policy_logps, batch.reference_logps, batch.rewards, batch.prompt_ids, beta=self.beta)
        log_ratios = (batch.policy_logps - batch.reference_logps).detach()
        _, counts = LF.quantile_rewards(batch.rewards, batch.prompt_ids)
        return LossOutput(loss=loss, implicit_rewards=self.beta * log_ratios + LF.qrpo_normalisers(self.beta, counts, log_ratios))


class REBELLoss(PreferenceLoss):
    """REBEL (Gao et al. 2024), one offline iteration against the reference: see :func:`functional.rebel_loss`.

        L = mean_x mean_{pairs i < j of x} ((r_i - r_j) / beta - (log(pi/pi_ref)(y_i|x) - log(pi/pi_ref)(y_j|x)))^2

    Args:
        beta: 1 / eta, REBEL's step size (the QRPO authors' grid for REBEL at 8B: 1e-6, 1e-4, 1e-2). The target
            of a log-ratio difference is the reward difference over beta: mind the rewards' scale.
    Every pair of a prompt's responses is used, ties included. The implicit reward is ``beta * log(pi/pi_ref)``.
    """

    def __init__(self, beta: float = 1e-4):
        super().__init__()
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def check_data(self, prompt_rewards: Sequence[Sequence[float]]) -> None:
        if not any(len(rewards) >= 2 for rewards in prompt_rewards):
            raise ValueError(f"REBELLoss: none of the {len(prompt_rewards)} training prompts has two responses, so "
                             "there is no pair to regress on; use data with several responses per prompt")

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        loss = LF.rebel_loss(batch.policy_logps, batch.reference_logps, batch.rewards, batch.prompt_ids, beta=self.beta)
        return LossOutput(loss=loss, implicit_rewards=self.beta * (batch.policy_logps - batch.reference_logps).detach())
