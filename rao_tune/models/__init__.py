"""Model builders and checkpointers that torchtune 0.6.1 lacks."""

from rao_tune.models.checkpointer import RewardModelHFCheckpointer
from rao_tune.models.reward import init_score_head, last_token_scores, reward_model

__all__ = ["RewardModelHFCheckpointer", "init_score_head", "last_token_scores", "reward_model"]
