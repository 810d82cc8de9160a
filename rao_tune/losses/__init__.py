"""Preference losses, all with one call signature: ``loss(ResponseLogProbs) -> LossOutput``.

Swap them from the command line with ``loss._component_=rao_tune.losses.<Name>`` (and the loss's own options).
"""

from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs
from rao_tune.losses.bradley_terry import BradleyTerryLoss, PairwiseOutput
from rao_tune.losses.dro import DROLoss
from rao_tune.losses.pairs import PAIR_RULES, preference_pairs
from rao_tune.losses.pairwise import (
    CalDPOLoss,
    DistillationLoss,
    DPOLoss,
    IPOLoss,
    ORPOLoss,
    PairwiseLoss,
    RewardAwareRPOLoss,
    SimPOLoss,
    SLiCHFLoss,
)
from rao_tune.losses.pointwise import QRPOLoss, REBELLoss, RewardPartitionLoss, RLOOLoss
from rao_tune.losses.rao import RAOLoss

__all__ = [
    "PAIR_RULES",
    "BradleyTerryLoss",
    "CalDPOLoss",
    "DPOLoss",
    "DROLoss",
    "DistillationLoss",
    "IPOLoss",
    "LossOutput",
    "ORPOLoss",
    "PairwiseLoss",
    "PairwiseOutput",
    "PreferenceLoss",
    "QRPOLoss",
    "RAOLoss",
    "REBELLoss",
    "RLOOLoss",
    "ResponseLogProbs",
    "RewardAwareRPOLoss",
    "RewardPartitionLoss",
    "SLiCHFLoss",
    "SimPOLoss",
    "preference_pairs",
]
