from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs
from rao_tune.losses.bradley_terry import BradleyTerryLoss, PairwiseOutput
from rao_tune.losses.pairs import PAIR_RULES, preference_pairs
from rao_tune.losses.rao import RAOLoss

__all__ = [
    "PAIR_RULES",
    "BradleyTerryLoss",
    "LossOutput",
    "PairwiseOutput",
    "PreferenceLoss",
    "RAOLoss",
    "ResponseLogProbs",
    "preference_pairs",
]
