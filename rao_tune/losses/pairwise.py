"""Pairwise preference losses (the RAO paper's baselines), all called like RAO: ``loss(ResponseLogProbs)``.

Each module builds (chosen, rejected) pairs from the batch's rewards with a pair rule (``pairs``; see
:func:`rao_tune.losses.pairs.preference_pairs`), applies its formula from :mod:`rao_tune.losses.functional`
to the pairs, and reports an implicit reward for every response so runs can be compared on the same metrics.
A batch without any pair (one response per prompt, or tied rewards) gives a zero loss that still backpropagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

from rao_tune.losses import functional as LF
from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs, require
from rao_tune.losses.pairs import preference_pairs, require_pairs


@dataclass
class Pairs:
    """Per-pair views of a batch (``[P]`` each); reference log-probs are None for reference-free losses."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Optional[Tensor]
    reference_rejected_logps: Optional[Tensor]
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def reference_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.policy_chosen_logps, self.policy_rejected_logps, self.reference_chosen_logps,
                self.reference_rejected_logps)  # fmt: skip


class PairwiseLoss(PreferenceLoss):
    """Base of the pairwise losses. Subclasses define ``pair_loss(pairs) -> scalar`` and
    ``implicit_rewards(batch) -> [N]``.

    Args:
        pairs: ``best_vs_random`` (default: the paper's UltraFeedback rule, seeded and fixed per prompt),
            ``best_vs_worst``, ``all_ordered`` (every pair with distinct rewards) or ``best_vs_others``.
        seed: seed of ``best_vs_random``.
    """

    def __init__(self, pairs: str = "best_vs_random", seed: int = 0):
        super().__init__()
        preference_pairs(Tensor([0.0]), Tensor([0]).long(), pairs)  # validates the rule name
        self.pairs, self.seed = pairs, seed

    def pair_loss(self, pairs: Pairs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_data(self, prompt_rewards: Sequence[Sequence[float]]) -> None:
        require_pairs(type(self).__name__, prompt_rewards)

    def implicit_rewards(self, batch: ResponseLogProbs) -> Tensor:
        """``beta * log pi/pi_ref``, the DPO-family reward; reference-free losses override it."""
        return self.beta * (batch.policy_logps - batch.reference_logps)

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        implicit_rewards = self.implicit_rewards(batch).detach()
        chosen, rejected = preference_pairs(batch.rewards.cpu(), batch.prompt_ids.cpu(), self.pairs, self.seed)
        if len(chosen) == 0:
            return LossOutput(loss=batch.policy_logps.sum() * 0.0, implicit_rewards=implicit_rewards)
        chosen, rejected = chosen.to(batch.policy_logps.device), rejected.to(batch.policy_logps.device)
        lengths = batch.response_lengths.to(batch.policy_logps.dtype)
        has_reference = batch.reference_logps is not None
        pairs = Pairs(
            policy_chosen_logps=batch.policy_logps[chosen],
            policy_rejected_logps=batch.policy_logps[rejected],
            reference_chosen_logps=batch.reference_logps[chosen] if has_reference else None,
            reference_rejected_logps=batch.reference_logps[rejected] if has_reference else None,
            chosen_lengths=lengths[chosen],
            rejected_lengths=lengths[rejected],
            chosen_rewards=batch.rewards[chosen],
            rejected_rewards=batch.rewards[rejected],
        )
        return LossOutput(loss=self.pair_loss(pairs), implicit_rewards=implicit_rewards)


class DPOLoss(PairwiseLoss):
    """DPO (Rafailov et al. 2023) with optional label smoothing (cDPO): see :func:`functional.dpo_loss`."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **pair_options):
        super().__init__(**pair_options)
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        require(self, 0 <= label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.dpo_loss(*pairs.reference_args, beta=self.beta, label_smoothing=self.label_smoothing)


class IPOLoss(PairwiseLoss):
    """IPO (Azar et al. 2023): see :func:`functional.ipo_loss`. ``average_log_probs`` (default True, as trl)
    divides each sequence log-prob by its length first; False uses the paper's summed log-probs."""

    def __init__(self, beta: float = 0.1, average_log_probs: bool = True, **pair_options):
        super().__init__(**pair_options)
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        self.beta, self.average_log_probs = beta, average_log_probs

    def pair_loss(self, pairs: Pairs) -> Tensor:
        logps = pairs.reference_args
        if self.average_log_probs:
            lengths = (pairs.chosen_lengths, pairs.rejected_lengths) * 2
            logps = tuple(value / length for value, length in zip(logps, lengths))
        return LF.ipo_loss(*logps, beta=self.beta)


class CalDPOLoss(PairwiseLoss):
    """Cal-DPO (Xiao et al. 2024): see :func:`functional.cal_dpo_loss`."""

    def __init__(self, beta: float = 0.1, **pair_options):
        super().__init__(**pair_options)
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        self.beta = beta

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.cal_dpo_loss(*pairs.reference_args, beta=self.beta)


class SimPOLoss(PairwiseLoss):
    """SimPO (Meng et al. 2024), reference-free: see :func:`functional.simpo_loss`."""

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, **pair_options):
        super().__init__(**pair_options)
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        require(self, gamma >= 0, f"gamma (the target margin) must be >= 0, got {gamma}")
        self.beta, self.gamma = beta, gamma

    def implicit_rewards(self, batch: ResponseLogProbs) -> Tensor:
        return self.beta * batch.policy_logps / batch.response_lengths

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.simpo_loss(
            pairs.policy_chosen_logps, pairs.policy_rejected_logps, pairs.chosen_lengths, pairs.rejected_lengths,
            beta=self.beta, gamma=self.gamma,
        )


class SLiCHFLoss(PairwiseLoss):
    """SLiC-HF (Zhao et al. 2023), reference-free hinge plus optional NLL: see :func:`functional.slic_hf_loss`.
    The implicit reward is the sequence log-likelihood, which the hinge ranks."""

    needs_reference = False

    def __init__(self, delta: float = 1.0, nll_weight: float = 0.0, **pair_options):
        super().__init__(**pair_options)
        require(self, delta > 0, f"delta (the hinge margin) must be > 0, got {delta}")
        require(self, nll_weight >= 0, f"nll_weight must be >= 0, got {nll_weight}")
        self.delta, self.nll_weight = delta, nll_weight

    def implicit_rewards(self, batch: ResponseLogProbs) -> Tensor:
        return batch.policy_logps

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.slic_hf_loss(
            pairs.policy_chosen_logps, pairs.policy_rejected_logps, pairs.chosen_lengths,
            delta=self.delta, nll_weight=self.nll_weight,
        )


class ORPOLoss(PairwiseLoss):
    """ORPO (Hong et al. 2024), reference-free: see :func:`functional.orpo_loss`. The implicit reward is the
    log odds of the token-averaged likelihood, which the odds-ratio term ranks."""

    needs_reference = False

    def __init__(self, odds_ratio_weight: float = 0.1, **pair_options):
        super().__init__(**pair_options)
        require(self, odds_ratio_weight > 0, f"odds_ratio_weight must be > 0, got {odds_ratio_weight}")
        self.odds_ratio_weight = odds_ratio_weight

    def implicit_rewards(self, batch: ResponseLogProbs) -> Tensor:
        return LF.log_odds(batch.policy_logps / batch.response_lengths)

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.orpo_loss(
            pairs.policy_chosen_logps, pairs.policy_rejected_logps, pairs.chosen_lengths, pairs.rejected_lengths,
            odds_ratio_weight=self.odds_ratio_weight,
        )


class DistillationLoss(PairwiseLoss):
    """Reward-model distillation (Fisch et al. 2024; the RAO paper's "RPO" baseline), explicit rewards:
    see :func:`functional.distillation_loss`."""

    def __init__(self, beta: float = 0.1, **pair_options):
        super().__init__(**pair_options)
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        self.beta = beta

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.distillation_loss(*pairs.reference_args, pairs.chosen_rewards, pairs.rejected_rewards, beta=self.beta)


class RewardAwareRPOLoss(PairwiseLoss):
    """NVIDIA's reward-aware preference optimization, explicit rewards, distance ``squared``, ``backward_kl`` or
    ``forward_kl``, reward scale ``eta``: see :func:`functional.reward_aware_rpo_loss`."""

    def __init__(self, beta: float = 0.1, eta: float = 1.0, distance: str = "squared", **pair_options):
        super().__init__(**pair_options)
        require(self, distance in LF.RPO_DISTANCES, f"distance must be one of {LF.RPO_DISTANCES}, got {distance!r}")
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        require(self, eta > 0, f"eta must be > 0, got {eta}")
        self.beta, self.eta, self.distance = beta, eta, distance

    def pair_loss(self, pairs: Pairs) -> Tensor:
        return LF.reward_aware_rpo_loss(
            *pairs.reference_args, pairs.chosen_rewards, pairs.rejected_rewards,
            beta=self.beta, eta=self.eta, distance=self.distance,
        )
