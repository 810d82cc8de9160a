from rao_tune.data.collate import collate_packed_batch, collate_reward_batch, longest_sequence, useful_tokens
from rao_tune.data.reward_dataset import (
    RewardAnnotatedDataset,
    reward_dataset,
    tokenize_conversation,
    tokenize_prompt,
    tokenize_prompt_and_responses,
    ultrafeedback_binarized_dataset,
    ultrafeedback_dataset,
)

__all__ = [
    "RewardAnnotatedDataset",
    "collate_packed_batch",
    "collate_reward_batch",
    "longest_sequence",
    "reward_dataset",
    "tokenize_conversation",
    "tokenize_prompt",
    "tokenize_prompt_and_responses",
    "ultrafeedback_binarized_dataset",
    "ultrafeedback_dataset",
    "useful_tokens",
]
