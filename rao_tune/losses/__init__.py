from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs
from rao_tune.losses.rao import RAOLoss

__all__ = ["LossOutput", "PreferenceLoss", "RAOLoss", "ResponseLogProbs"]
