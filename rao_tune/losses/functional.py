"""Preference losses as plain functions over per-sequence log-probabilities.

Shapes: a batch holds N responses to B prompts, flattened. Every tensor argument is ``[N]``:

- ``policy_logps`` / ``reference_logps``: log pi(y|x) summed over the response tokens.
- ``policy_prompt_logps`` / ``reference_prompt_logps``: log pi(x - t0 | t0), summed over the prompt
  tokens after the shared first token t0. Every response of one prompt carries the same value.
- ``rewards``: the explicit reward r(x, y) of each response.
- ``prompt_ids``: which prompt each response belongs to (any integer ids; equal id = same prompt).
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_prompt_mean(values: Tensor, prompt_ids: Tensor) -> Tensor:
    """Mean of ``values`` over the responses of each prompt; returns one value per distinct prompt id."""
    _, prompt_index = torch.unique(prompt_ids, return_inverse=True)
    num_prompts = int(prompt_index.max()) + 1
    sums = values.new_zeros(num_prompts).index_add(0, prompt_index, values)
    counts = torch.bincount(prompt_index, minlength=num_prompts).to(values.dtype)
    return sums / counts


def rao_implicit_rewards(
    policy_logps: Tensor,
    reference_logps: Tensor,
    policy_prompt_logps: Tensor,
    reference_prompt_logps: Tensor,
    *,
    beta: float,
    z0: float,
) -> Tensor:
    """RAO's implicit reward ``beta * log(pi/pi_ref)(y|x) + beta * log Z_i`` (Algorithm 1, lines 6-10).

    ``log Z_i = z0 + stopgrad(log pi(x - t0|t0) - log pi_ref(x - t0|t0))`` is the prefix-consistency
    normaliser (Eq. 6): the prompt's log-ratio after t0 plus the constant log Z_0. It is detached: the
    normaliser is a target-side constant, not something the policy may move to lower the loss.
    """
    response_logratio = policy_logps - reference_logps
    prompt_logratio = (policy_prompt_logps - reference_prompt_logps).detach()
    return beta * (response_logratio + z0 + prompt_logratio)


def rao_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    policy_prompt_logps: Tensor,
    reference_prompt_logps: Tensor,
    rewards: Tensor,
    prompt_ids: Tensor,
    *,
    beta: float,
    z0: float,
) -> Tensor:
    """Reward Alignment Optimization loss (Algorithm 1 of the RAO paper).

        r_theta(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)] + beta * [z0 + sg(log pi(x-t0|t0) - log pi_ref(x-t0|t0))]
        L = mean over prompts x of ( mean over responses y of x of (r(x, y) - r_theta(x, y))^2 )

    ``z0`` is log Z_0 (the paper's "Z_0 = 50" is this log value). Returns the scalar loss.
    """
    implicit_rewards = rao_implicit_rewards(
        policy_logps, reference_logps, policy_prompt_logps, reference_prompt_logps, beta=beta, z0=z0
    )
    squared_error = (rewards - implicit_rewards) ** 2
    return per_prompt_mean(squared_error, prompt_ids).mean()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Bradley-Terry reward-model loss (RAO paper Eq. 2; Ouyang et al. 2022): ``mean(-log sigmoid(r_w - r_l))``
    over pairs, where ``r_w`` / ``r_l`` are the scalar scores of the preferred / dispreferred response.
    ``logsigmoid`` keeps large negative margins finite."""
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores).mean()


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Fraction of pairs the scores order correctly; a tie counts as wrong."""
    return (chosen_scores > rejected_scores).float().mean()
