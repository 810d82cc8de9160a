"""The pieces of online RLHF with PPO (the RAO paper's Eq. 3 baseline) that are not a loss: prompts in, sampled
responses out, and the rollout statistics PPO learns from.

A rollout is scored in the batch layout of every other recipe (:mod:`rao_tune.data.collate`, packed: each prompt
once, followed by its k sampled responses, prompts not scored), so the policy's and reference's per-token
log-probs come from the same fused code as RAO's, and the value and reward models read the same rows. Per
response token t (PPO's action; the state is the prompt and the response before t):

    old_logps[t], ref_logps[t]   log pi_old(y_t | s_t), log pi_ref(y_t | s_t)
    values[t]                    V(s_t): the value head at the position that predicts y_t
    rewards[t]                   -kl_coeff * (old_logps[t] - ref_logps[t]), plus the reward model's score of the
                                 whole response at its last token (torchtune's ``get_rewards_ppo``)
    advantages, returns          GAE(gamma, lambda) over the response, advantages whitened over the batch
                                 (torchtune's ``estimate_advantages``)

Everything is ``[N, L]``: N responses, padded to the longest (L), with ``mask`` marking real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torchtune import rlhf

from rao_tune.eval.generation import decode_batch, left_padded
from rao_tune.training.logprobs import token_logps
from rao_tune.training.value import head_outputs


def collate_prompts(samples: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """Prompts of reward-dataset examples (their responses and rewards are not used): ``prompt_tokens [B, P]``
    left-padded with ``pad_id`` and ``prompt_lengths [B]``."""
    prompts = [sample["prompt_tokens"] for sample in samples]
    return {"prompt_tokens": left_padded(prompts, pad_id),
            "prompt_lengths": torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)}


def prompt_lists(batch: dict[str, Tensor]) -> list[list[int]]:
    """The token lists of :func:`collate_prompts`'s batch."""
    width = batch["prompt_tokens"].shape[1]
    return [row[width - int(length):].tolist() for row, length in zip(batch["prompt_tokens"], batch["prompt_lengths"])]


@dataclass
class Samples:
    """Sampled responses, prompt-major (prompt 0's k samples, then prompt 1's, ...). ``responses`` hold the
    tokens up to and including the first stop token (all ``max_new_tokens`` if none came: ``ended`` False);
    ``entropies`` the summed entropy of the policy's next-token distributions over each response's tokens."""

    responses: list[list[int]]
    ended: list[bool]
    entropies: list[float]


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 1.0,
    stop_early: bool = True,
    rng: Optional[torch.Generator] = None,
) -> Samples:
    """Sample ``samples_per_prompt`` responses to each prompt with the shared decoding core
    (:func:`rao_tune.eval.generation.decode_batch`: torchtune's ``generate`` and a KV cache), all sequences in one
    batch, from the whole distribution at ``temperature`` (0: greedy). ``rng=None`` samples from
    the global generator, which step checkpoints save and restore. ``stop_early=False`` always runs
    ``max_new_tokens`` decoding steps: under FSDP every process must run the same number of forward passes
    (their all-gathers are collective), so only one process may stop when its own sequences are done."""
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    stops = set(stop_tokens)
    new_tokens, logits = decode_batch(
        model, repeated, max_new_tokens=max_new_tokens, pad_id=pad_id, stop_tokens=stop_tokens, device=device,
        dtype=dtype, temperature=temperature, stop_early=stop_early, rng=rng,
    )
    # The entropy of the model's own distribution at each generated position, one sequence at a time (fp32 copies of
    # all the logits would be several times their size).
    token_entropies = torch.stack([torch.special.entr(torch.softmax(row.float(), dim=-1)).sum(-1) for row in logits])
    del logits
    samples = Samples([], [], [])
    for row in range(len(repeated)):
        new = new_tokens[row].tolist()
        end = next((position + 1 for position, token in enumerate(new) if token in stops), None)
        response = new[:end] if end is not None else new
        samples.responses.append(response)
        samples.ended.append(end is not None)
        samples.entropies.append(float(token_entropies[row, : len(response)].sum()))
    return samples


def rollout_examples(prompts: Sequence[Sequence[int]], samples: Samples, samples_per_prompt: int) -> list[dict]:
    """Prompts with their sampled responses as examples of :mod:`rao_tune.data.collate` (rewards filled later)."""
    return [{"prompt_tokens": list(prompt),
             "response_tokens": samples.responses[index * samples_per_prompt:(index + 1) * samples_per_prompt],
             "rewards": [0.0] * samples_per_prompt}
            for index, prompt in enumerate(prompts)]


@dataclass
class ResponseLayout:
    """Where each response token's scored pair sits: ``scored`` selects them among the batch's scored pairs
    (``[T]`` bool), ``rows`` / ``columns`` place them in ``[N, L]``; ``mask`` marks the real tokens there."""

    scored: Tensor
    rows: Tensor
    columns: Tensor
    mask: Tensor

    @classmethod
    def of(cls, batch: dict[str, Tensor]) -> "ResponseLayout":
        num_responses = batch["prompt_ids"].numel()
        segments = batch["target_segments"]
        scored = segments < num_responses
        rows = segments[scored]
        order = torch.arange(rows.numel(), device=rows.device)
        # A response's pairs are listed in order: its column is its index minus its response's first index.
        first = torch.full((num_responses,), rows.numel(), dtype=torch.long, device=rows.device)
        first = first.scatter_reduce(0, rows, order, reduce="amin")
        columns = order - first[rows]
        lengths = batch["response_lengths"].to(rows.device)
        mask = torch.arange(int(lengths.max()), device=rows.device)[None, :] < lengths[:, None]
        return cls(scored, rows, columns, mask)

    def pad(self, response_values: Tensor) -> Tensor:
        """``[N, L]`` from one value per response token (in scored-pair order); 0 at padding. Differentiable."""
        out = response_values.new_zeros(self.mask.shape)
        return out.index_put((self.rows, self.columns), response_values)


def response_token_logps(model: nn.Module, batch: dict[str, Tensor], layout: ResponseLayout, chunk_tokens: int) -> Tensor:
    """``[N, L]`` log-probs of the response tokens under ``model`` (one forward pass, fused log-probs)."""
    return layout.pad(token_logps(model, batch, chunk_tokens=chunk_tokens)[layout.scored])


def response_token_values(model: nn.Module, batch: dict[str, Tensor], layout: ResponseLayout) -> Tensor:
    """``[N, L]`` V(s_t): the value head at each position that predicts a response token."""
    return layout.pad(head_outputs(model, batch, batch["logit_positions"][layout.scored]))


@dataclass
class Rollout:
    """One minibatch of a rollout, with what PPO's loss reads (all ``[N, L]`` but ``scores``)."""

    batch: dict[str, Tensor]
    layout: ResponseLayout
    old_logps: Tensor
    ref_logps: Tensor
    values: Tensor
    scores: Tensor  # [N] the reward model's score (after any missing-stop-token replacement)
    rewards: Tensor = None  # per token: KL penalty, plus the score at the last token
    advantages: Tensor = None
    returns: Tensor = None


def add_advantages(rollouts: Sequence[Rollout], *, kl_coeff: float, gamma: float, lmbda: float) -> None:
    """Per-token rewards (KL penalty, score at the last token), then GAE advantages (whitened over all the
    minibatches of this process's rollout together) and returns, into each rollout."""
    width = max(rollout.layout.mask.shape[1] for rollout in rollouts)

    def joined(name: str) -> Tensor:
        return torch.cat([nn.functional.pad(getattr(r, name), (0, width - getattr(r, name).shape[1])) for r in rollouts])

    mask = torch.cat([nn.functional.pad(r.layout.mask, (0, width - r.layout.mask.shape[1])) for r in rollouts])
    last = mask.sum(-1) - 1
    rewards, _, _ = rlhf.get_rewards_ppo(torch.cat([r.scores for r in rollouts]), joined("old_logps"),
                                         joined("ref_logps"), kl_coeff, valid_score_idxs=last)
    rewards = rewards * mask  # padding: no reward (the KL there is 0 - 0 anyway)
    advantages, returns = rlhf.estimate_advantages(joined("values"), rewards, gamma, lmbda, masks=mask)
    start = 0
    for rollout in rollouts:
        rows, columns = slice(start, start + rollout.scores.numel()), slice(0, rollout.layout.mask.shape[1])
        rollout.rewards, rollout.advantages, rollout.returns = rewards[rows, columns], advantages[rows, columns], returns[rows, columns]
        start += rollout.scores.numel()
