"""Per-sequence log-probabilities from one forward pass, without full-vocabulary fp32 logits for the batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _next_token_logps(logits: Tensor, next_tokens: Tensor) -> Tensor:
    """log p(next token) for one chunk of positions, computed in fp32."""
    logits = logits.float()
    return logits.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Return ``(response_logps, prompt_logps)``, each ``[N]``, from a single forward pass of ``model``.

    The model should have ``set_num_output_chunks(k)`` applied: its logits then come as k chunks along
    the sequence in the model's dtype, and each chunk is upcast and reduced to one log-prob per position
    under activation checkpointing. So the fp32 logits of only one chunk exist at a time, in forward and in
    backward.
    """
    tokens = batch["tokens"]
    logits = model(tokens)
    chunks = logits if isinstance(logits, list) else [logits]
    # Position i predicts token i + 1; the last position predicts nothing (its masks are False).
    next_tokens = torch.roll(tokens, shifts=-1, dims=1)
    next_token_chunks = next_tokens.split([chunk.shape[1] for chunk in chunks], dim=1)
    if torch.is_grad_enabled():
        token_logps = [
            checkpoint(_next_token_logps, chunk, targets, use_reentrant=False)
            for chunk, targets in zip(chunks, next_token_chunks)
        ]
    else:
        token_logps = [_next_token_logps(chunk, targets) for chunk, targets in zip(chunks, next_token_chunks)]
    token_logps = torch.cat(token_logps, dim=1)
    zero = token_logps.new_zeros(())
    response_logps = torch.where(batch["response_mask"], token_logps, zero).sum(-1)
    prompt_logps = torch.where(batch["prompt_mask"], token_logps, zero).sum(-1)
    return response_logps, prompt_logps
