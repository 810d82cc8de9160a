"""Preference pairs from prompts with any number of scored responses.

A pair ``(chosen, rejected)`` indexes two responses of the same prompt with ``reward[chosen] > reward[rejected]``;
responses with equal rewards are never paired, and a prompt whose responses all tie gives no pair.
"""

from __future__ import annotations

import logging
import random
import struct
import zlib
from typing import Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

PAIR_RULES = ("best_vs_others", "all_ordered", "best_vs_worst", "best_vs_random")


def _stable_draw(seed: int, prompt_rewards: list[float], num_choices: int) -> int:
    """A draw fixed by the seed and the prompt's rewards: the same on every rank, epoch and resumed run, so a
    prompt keeps its pair for the whole training, as when a dataset is binarised once."""
    key = zlib.crc32(struct.pack(f"<q{len(prompt_rewards)}d", seed, *prompt_rewards))
    return random.Random(key).randrange(num_choices)


def preference_pairs(
    rewards: Tensor, prompt_ids: Tensor, rule: str = "best_vs_others", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Return ``(chosen_index, rejected_index)``, two ``[P]`` long tensors into the flat batch.

    Rules, per prompt (best = highest reward, the first one on a tie):
        best_vs_others: best against every response with a lower reward (a chosen/rejected row gives its pair).
        all_ordered: every ordered pair with distinct rewards, k(k-1)/2 for k distinct rewards.
        best_vs_worst: best against the lowest reward.
        best_vs_random: best against one lower-reward response, drawn from ``seed`` and the prompt's rewards
            (UltraFeedback's binarisation rule, as in the RAO paper and Zephyr; fixed per prompt across epochs).
    """
    if rule not in PAIR_RULES:
        raise ValueError(f"pair rule must be one of {PAIR_RULES}, got {rule!r}")
    chosen, rejected = [], []
    for prompt_id in torch.unique(prompt_ids, sorted=True):
        members = (prompt_ids == prompt_id).nonzero().squeeze(-1).tolist()
        member_rewards = rewards[members].tolist()
        if rule == "all_ordered":
            for i, r_i in zip(members, member_rewards):
                for j, r_j in zip(members, member_rewards):
                    if r_i > r_j:
                        chosen.append(i)
                        rejected.append(j)
            continue
        best_position = max(range(len(members)), key=member_rewards.__getitem__)
        best_reward = member_rewards[best_position]
        lower = [m for m, r in zip(members, member_rewards) if r < best_reward]
        if not lower:
            continue
        if rule == "best_vs_worst":
            lower = [members[min(range(len(members)), key=member_rewards.__getitem__)]]
        elif rule == "best_vs_random":
            lower = [lower[_stable_draw(seed, member_rewards, len(lower))]]
        chosen.extend([members[best_position]] * len(lower))
        rejected.extend(lower)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def require_pairs(loss_name: str, prompt_rewards: Sequence[Sequence[float]]) -> None:
    """Refuse training data in which no prompt has two responses with different rewards: every pair rule gives
    such data zero pairs, so a pairwise loss would train the whole run on a loss of 0 with a gradient of 0."""
    ranked = sum(1 for rewards in prompt_rewards if len(set(rewards)) > 1)
    if ranked == 0:
        counts = sorted({len(rewards) for rewards in prompt_rewards})
        raise ValueError(
            f"{loss_name}: none of the {len(prompt_rewards)} training prompts has two responses with different "
            f"rewards (responses per prompt: {counts}), so this loss would find no pair to train on; use data with "
            "several scored responses per prompt, or a point-wise loss such as RAOLoss"
        )
    if ranked < len(prompt_rewards):
        log.warning("%s: %d of %d training prompts give no pair (one response, or tied rewards) and teach nothing",
                    loss_name, len(prompt_rewards) - ranked, len(prompt_rewards))
