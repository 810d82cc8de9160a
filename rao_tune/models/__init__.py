"""Model builders and checkpointers that torchtune 0.6.1 lacks: reward models from any decoder, their HF
checkpointer, and EuroLLM."""

from rao_tune.models.checkpointer import RewardModelHFCheckpointer
from rao_tune.models.eurollm import (
    EuroLLMTokenizer,
    eurollm,
    eurollm_1_7b,
    eurollm_1_7b_reward_model,
    eurollm_9b,
    eurollm_9b_reward_model,
    eurollm_tokenizer,
)
from rao_tune.models.reward import init_score_head, last_token_scores, reward_model

__all__ = [
    "EuroLLMTokenizer",
    "RewardModelHFCheckpointer",
    "eurollm",
    "eurollm_1_7b",
    "eurollm_1_7b_reward_model",
    "eurollm_9b",
    "eurollm_9b_reward_model",
    "eurollm_tokenizer",
    "init_score_head",
    "last_token_scores",
    "reward_model",
]
