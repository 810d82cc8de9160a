"""Model builders and checkpointers that torchtune 0.6.1 lacks: any HF Llama/Qwen2 folder with its own tokenizer
and chat template, reward models from any decoder, their HF checkpointer, and EuroLLM."""

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
from rao_tune.models.hf_model import hf_model, hf_model_type, lora_hf_model, read_hf_config
from rao_tune.models.hf_tokenizer import HFChatTokenizer
from rao_tune.models.reward import init_score_head, last_token_scores, reward_model

__all__ = [
    "EuroLLMTokenizer",
    "HFChatTokenizer",
    "RewardModelHFCheckpointer",
    "eurollm",
    "eurollm_1_7b",
    "eurollm_1_7b_reward_model",
    "eurollm_9b",
    "eurollm_9b_reward_model",
    "eurollm_tokenizer",
    "hf_model",
    "hf_model_type",
    "init_score_head",
    "last_token_scores",
    "lora_hf_model",
    "read_hf_config",
    "reward_model",
]
