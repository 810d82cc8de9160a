"""Per-sequence log-probabilities from one forward pass, without ever holding the batch's logits.

The decoder runs up to its final norm; the output projection and the log-softmax then run fused, one chunk of
scored tokens at a time (:class:`FusedTokenLogProbs`), and backward recomputes each chunk's logits instead of
keeping them. Only the scored positions are projected (no padding, no last token of a sequence), and in backward
only the tokens whose log-prob has a non-zero gradient (RAO's prompt term, for one, is detached).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules.peft import LoRALinear

from rao_tune.training.attention import model_inputs

DEFAULT_CHUNK_TOKENS = 1024


class FusedTokenLogProbs(torch.autograd.Function):
    """``log softmax(hidden @ weight.T)[t, targets[t]]`` for every row t, in fp32, one chunk of rows at a time.

    Forward keeps ``hidden``, ``weight`` and one fp32 log-normaliser per row. With ``g`` the incoming gradient
    and ``p = softmax(logits)``, the gradient of the logits is ``g * (onehot(target) - p)``; backward recomputes
    the logits chunk by chunk (over the rows whose ``g`` is not zero) and rebuilds ``p`` from the saved
    normalisers (recomputed in low precision), so at most one chunk of logits exists at any time.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
        token_logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_normalisers = torch.empty_like(token_logps)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = (hidden[rows] @ weight.T).float()
            log_normalisers[rows] = torch.logsumexp(logits, dim=-1)
            token_logps[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - log_normalisers[rows]
        ctx.save_for_backward(hidden, weight, targets, log_normalisers)
        ctx.chunk_tokens = chunk_tokens
        return token_logps

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, targets, log_normalisers = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        # Tokens with zero gradient (e.g. RAO's detached prompt log-ratio) cost nothing in backward.
        active = grad_logps.nonzero().squeeze(-1)
        for start in range(0, active.numel(), ctx.chunk_tokens):
            rows = active[start : start + ctx.chunk_tokens]
            chunk_hidden = hidden[rows]
            logits = (chunk_hidden @ weight.T).float()
            # In low precision a matmul over other rows may round a logit differently from forward: recompute the
            # normaliser so the softmax sums to 1 (in fp32 the saved one is exact to ~1e-7 and saves a pass).
            if hidden.dtype == torch.float32:
                chunk_normalisers = log_normalisers[rows]
            else:
                chunk_normalisers = torch.logsumexp(logits, dim=-1)
            grad_logits = torch.exp_(logits.sub_(chunk_normalisers[:, None])).neg_()  # -softmax, in place
            grad_logits.scatter_add_(-1, targets[rows, None], torch.ones_like(grad_logits[:, :1]))
            grad_logits = grad_logits.mul_(grad_logps[rows, None]).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:  # accumulated in the weight's dtype, once per chunk (as chunked cross-entropy does)
                grad_weight.addmm_(grad_logits.T, chunk_hidden)
        return grad_hidden, grad_weight, None, None


def fused_token_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """``[T]`` fp32 log-probs of ``targets [T]`` under ``softmax(hidden [T, D] @ weight[V, D].T)``."""
    return FusedTokenLogProbs.apply(hidden, weight, targets, chunk_tokens)


def refuse_output_adapter(model: nn.Module) -> None:
    """Fused log-probs read the output projection's weight directly, which would skip an adapter on it."""
    if isinstance(model.output, LoRALinear):
        raise ValueError(
            "apply_lora_to_output=True is not supported: log-probs are computed from the output projection's weight "
            "without materialising logits, which would skip an adapter on it. Set model.apply_lora_to_output=False."
        )


def output_projection_weight(model: nn.Module) -> Tensor:
    """The ``[vocab, dim]`` weight of a torchtune decoder's output projection (the embedding when tied, as in
    Qwen2.5's small models); a QLoRA model's frozen NF4 projection is dequantized for the call."""
    output = model.output
    refuse_output_adapter(model)
    weight = output.tied_module.weight if hasattr(output, "tied_module") else output.weight
    return weight.get_original_weight() if isinstance(weight, NF4Tensor) else weight


@contextmanager
def _unembedding_to_logps(model: nn.Module, logit_positions: Tensor, targets: Tensor, chunk_tokens: int) -> Iterator[None]:
    """Make ``model(...)`` return the fused log-probs of ``targets`` at ``logit_positions`` instead of logits.

    torchtune 0.6.1's ``TransformerDecoder.unembed`` (final norm + projection) has no switch to skip the
    projection (later releases added ``skip_output_layer``), so this instance's ``unembed`` is shadowed for the
    call. The fused projection must run inside ``model.__call__``: with torchtune's ``reshard_after_forward=True``
    FSDP2 holds the root module's parameters (embedding, norm, output projection) unsharded only during its
    forward, frees them after it, and all-gathers them into the same tensors again when the gradient reaches the
    forward's output, before this function's backward reads the weight it saved.
    """

    def unembed(hidden: Tensor) -> Tensor:
        weight = output_projection_weight(model)
        if isinstance(weight, DTensor):
            raise ValueError(
                "the output projection is still sharded inside the model's forward: it was sharded as an FSDP unit "
                "of its own (custom_sharded_layers names 'output' or, for tied embeddings, 'tok_embeddings'). "
                "Leave it to the root unit: fused log-probs project inside the root module's forward."
            )
        hidden = model.norm(hidden)
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_positions)
        return fused_token_logps(hidden, weight, targets, chunk_tokens)

    model.unembed = unembed
    try:
        yield
    finally:
        del model.unembed


def token_logps(model: nn.Module, batch: dict[str, Tensor], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """``[T]`` fp32 log-probs of the batch's scored tokens (``target_tokens`` at ``logit_positions``), from one
    forward pass of the decoder over either layout of :mod:`rao_tune.data.collate`."""
    with _unembedding_to_logps(model, batch["logit_positions"], batch["target_tokens"], chunk_tokens):
        return model(batch["tokens"], **model_inputs(batch, model))


def sequence_logps(
    model: nn.Module, batch: dict[str, Tensor], *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> tuple[Tensor, Tensor]:
    """Return ``(response_logps, prompt_logps)``, each ``[N]`` fp32, from one forward pass of ``model``:
    log pi(y | x) summed over each response's tokens, and log pi(x - t0 | t0) of its prompt."""
    return segment_sums(token_logps(model, batch, chunk_tokens=chunk_tokens), batch)


def segment_sums(scored_token_logps: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Sum the ``[T]`` scored tokens' log-probs into ``(response_logps, prompt_logps)``, each ``[N]`` (a prompt's
    sum repeated for each of its responses), following the batch's ``target_segments``."""
    num_responses = batch["prompt_ids"].numel()
    num_prompts = int(batch["prompt_ids"].max()) + 1  # every prompt of a batch has a response
    sums = scored_token_logps.new_zeros(num_responses + num_prompts)
    sums = sums.index_add(0, batch["target_segments"], scored_token_logps)
    return sums[:num_responses], sums[num_responses:][batch["prompt_ids"]]
