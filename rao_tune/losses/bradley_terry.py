"""The Bradley-Terry loss of a scalar reward model, over pairs built from multi-response rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from rao_tune.losses.functional import bradley_terry_loss, pairwise_accuracy
from rao_tune.losses.pairs import preference_pairs, require_pairs


@dataclass
class PairwiseOutput:
    """Loss (mean over pairs), accuracy, mean margin ``r_w - r_l``, and how many pairs they average."""

    loss: Tensor
    accuracy: float
    margin: float
    num_pairs: int


class BradleyTerryLoss(nn.Module):
    """``L = mean over pairs of -log sigmoid(r(x, y_w) - r(x, y_l))`` (RAO paper Eq. 2).

    Args:
        pairs: how pairs come from a prompt's responses (:func:`rao_tune.losses.pairs.preference_pairs`):
            ``best_vs_others`` (default; a chosen/rejected row gives its one pair) or ``all_ordered``
            (every pair with distinct rewards); ``best_vs_worst`` and ``best_vs_random`` also work.
        seed: seed of ``best_vs_random``.

    Each micro-batch averages over its own pairs (as trl does per device). When pair counts differ between
    micro-batches or ranks (``all_ordered``, ties), the trained objective weighs pairs per micro-batch while the
    logged ``loss`` / ``eval_loss`` weigh every pair equally; with one pair per prompt they are the same.    """

    def __init__(self, pairs: str = "best_vs_others", seed: Optional[int] = 0):
        super().__init__()
        self.pairs = pairs
        self.seed = seed or 0
        preference_pairs(torch.zeros(1), torch.zeros(1, dtype=torch.long), pairs)  # validates the rule name

    def check_data(self, prompt_rewards: Sequence[Sequence[float]]) -> None:
        require_pairs(type(self).__name__, prompt_rewards)

    def forward(self, scores: Tensor, rewards: Tensor, prompt_ids: Tensor) -> PairwiseOutput:
        chosen, rejected = preference_pairs(rewards.cpu(), prompt_ids.cpu(), self.pairs, self.seed)
        if len(chosen) == 0:
            # Keep the graph (every FSDP rank must run backward) but contribute nothing.
            return PairwiseOutput(loss=scores.sum() * 0.0, accuracy=0.0, margin=0.0, num_pairs=0)
        chosen_scores, rejected_scores = scores[chosen.to(scores.device)], scores[rejected.to(scores.device)]
        return PairwiseOutput(
            loss=bradley_terry_loss(chosen_scores, rejected_scores),
            accuracy=pairwise_accuracy(chosen_scores, rejected_scores).item(),
            margin=(chosen_scores - rejected_scores).mean().item(),
            num_pairs=len(chosen),
        )
