"""Collate prompts with a varying number of responses into one flat, right-padded batch of sequences."""

from __future__ import annotations

from typing import Sequence

import torch


def collate_reward_batch(samples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Flatten B prompts with k_i responses each into N = sum k_i sequences ``prompt + response``.

    Returns (N sequences of padded length S):
        tokens [N, S]: right-padded with ``pad_id`` (the model is causal, so padding never leaks back).
        prompt_mask [N, S]: True at position i when token i+1 is a prompt token after t0, so that
            summing next-token log-probs over it gives log pi(x - t0 | t0).
        response_mask [N, S]: True at position i when token i+1 is a response token: log pi(y | x).
        rewards [N] (fp32), prompt_ids [N] (which of the B prompts), response_lengths [N],
        sequence_lengths [N] (prompt + response, where a reward model reads its score).
    """
    sequences, prompt_lengths, response_lengths, rewards, prompt_ids = [], [], [], [], []
    for prompt_index, sample in enumerate(samples):
        prompt = sample["prompt_tokens"]
        for response, reward in zip(sample["response_tokens"], sample["rewards"]):
            sequences.append(prompt + response)
            prompt_lengths.append(len(prompt))
            response_lengths.append(len(response))
            rewards.append(reward)
            prompt_ids.append(prompt_index)

    max_len = max(len(seq) for seq in sequences)
    tokens = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)

    # Position i holds the log-prob of token i + 1.
    positions = torch.arange(max_len).unsqueeze(0)
    prompt_len = torch.tensor(prompt_lengths).unsqueeze(1)
    response_len = torch.tensor(response_lengths).unsqueeze(1)
    prompt_mask = positions < prompt_len - 1
    response_mask = (positions >= prompt_len - 1) & (positions < prompt_len - 1 + response_len)
    return {
        "tokens": tokens,
        "prompt_mask": prompt_mask,
        "response_mask": response_mask,
        "rewards": torch.tensor(rewards, dtype=torch.float32),
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.long),
        "response_lengths": torch.tensor(response_lengths, dtype=torch.long),
        "sequence_lengths": torch.tensor([len(seq) for seq in sequences], dtype=torch.long),
    }
