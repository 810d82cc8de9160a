"""Attention masks for packed, prefix-shared rows (:func:`rao_tune.data.collate_packed_batch`).

A token may attend to an earlier token of the same row when both belong to the same prompt group and the earlier
one is a prompt token or belongs to the same response: every response sees its prompt and itself, never a
sibling response and never another group. On CUDA (compute capability >= 7.5) the rule becomes a flex-attention
``BlockMask``, which skips the masked blocks. On CPU, a model prepared by :func:`enable_prefix_shared_attention`
(every model the recipes build) takes the groups' spans and runs SDPA on the allowed blocks only (a dense mask
over a 4k-token row spent most of a k = 4 step's attention on pairs the mask discards); anything else gets a
dense boolean mask.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention

from rao_tune.data.collate import collate_packed_batch

# Packed rows hold up to this many tokens unless max_row_tokens says otherwise (and the model allows it): long
# enough for a prompt with several long responses, short enough that dense attention on CPU stays cheap.
DEFAULT_MAX_ROW_TOKENS = 4096


def flex_attention_on(device: torch.device) -> bool:
    """Whether packed batches on ``device`` use a flex-attention ``BlockMask``. The same condition as torchtune
    0.6.1's attention routing (a BlockMask goes to flex attention when CUDA has compute capability >= 7.5)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (7, 5)


def prefix_sharing_mask(group_ids: Tensor, segment_ids: Tensor) -> Tensor:
    """Dense ``[R, S, S]`` boolean mask, True where query i may attend to key j (torchtune's convention)."""
    length = group_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=group_ids.device).tril()
    same_group = group_ids[:, :, None] == group_ids[:, None, :]
    visible = (segment_ids[:, None, :] == 0) | (segment_ids[:, :, None] == segment_ids[:, None, :])
    return causal & same_group & visible


def prefix_sharing_block_mask(group_ids: Tensor, segment_ids: Tensor) -> Any:
    """The same rule as :func:`prefix_sharing_mask` as a flex-attention ``BlockMask``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(row: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        same_group = group_ids[row, query] == group_ids[row, key]
        visible = (segment_ids[row, key] == 0) | (segment_ids[row, query] == segment_ids[row, key])
        return (key <= query) & same_group & visible

    rows, length = group_ids.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=group_ids.device)


class PrefixSharedGroups:
    """The prefix-sharing rule of packed rows as spans, for attention that computes only the allowed blocks (CPU):
    per row, each prompt group's prompt span and its responses' spans (``[start, end)`` columns). A prompt attends
    causally to itself; a response to its whole prompt and causally to itself; padding to nothing (its output is
    zero and never read)."""

    def __init__(self, group_ids: Tensor, segment_ids: Tensor) -> None:
        self.rows: list[list[tuple[tuple[int, int], list[tuple[int, int]]]]] = []
        for groups, segments in zip(group_ids.tolist(), segment_ids.tolist()):
            spans: dict[int, dict[int, list[int]]] = {}
            for column, (group, segment) in enumerate(zip(groups, segments)):
                if group >= 0:
                    span = spans.setdefault(group, {}).setdefault(segment, [column, column])
                    span[1] = column + 1
            row = [(tuple(parts.pop(0)), [tuple(span) for span in parts.values()]) for parts in spans.values()]
            # prefix_shared_attention assembles the row from these spans in column order, padding last: they must
            # tile the real tokens (as collate_packed_batch lays them out)
            tiles = sorted(span for prompt, responses in row for span in (prompt, *responses))
            ends = [0] + [end for _, end in tiles]
            if [start for start, _ in tiles] != ends[:-1] or ends[-1] != sum(group >= 0 for group in groups):
                raise ValueError("packed row whose prompt and response spans do not tile its real tokens")
            self.rows.append(row)


def prefix_shared_attention(q: Tensor, k: Tensor, v: Tensor, groups: PrefixSharedGroups) -> Tensor:
    """SDPA over the allowed blocks only (``[B, H, S, D]`` in and out): one causal call per prompt, one per
    response over its prompt's keys and its own. Equal to SDPA with :func:`prefix_sharing_mask` on every real
    token, at the cost of the blocks that mask keeps instead of the whole row's ``S^2``. The pieces are
    concatenated in column order (no in-place writes, whose backward would touch the whole output each time)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for row, row_groups in enumerate(groups.rows):
        pieces: list[tuple[int, Tensor]] = []
        for (prompt_start, prompt_end), responses in row_groups:
            prompt = slice(prompt_start, prompt_end)
            pieces.append((prompt_start, sdpa(q[row, :, prompt], k[row, :, prompt], v[row, :, prompt], is_causal=True)))
            for start, end in responses:
                keys = torch.cat([k[row, :, prompt], k[row, :, start:end]], dim=1)
                values = torch.cat([v[row, :, prompt], v[row, :, start:end]], dim=1)
                length, prompt_length = end - start, prompt_end - prompt_start
                visible = torch.ones(length, prompt_length + length, dtype=torch.bool, device=q.device)
                visible[:, prompt_length:] = visible[:, prompt_length:].tril()
                pieces.append((start, sdpa(q[row, :, start:end], keys, values, attn_mask=visible)))
        pieces.sort(key=lambda piece: piece[0])
        filled = sum(piece.shape[1] for _, piece in pieces)
        padding = q.new_zeros(q.shape[1], q.shape[2] - filled, q.shape[3])  # the row's tail
        rows.append(torch.cat([piece for _, piece in pieces] + [padding], dim=1))
    return torch.stack(rows)


def enable_prefix_shared_attention(model: nn.Module) -> nn.Module:
    """Let ``model``'s attention layers take a :class:`PrefixSharedGroups` mask (computed by
    :func:`prefix_shared_attention`); any other mask still goes to torchtune's own attention call. Where flex
    attention runs (CUDA) its BlockMask already skips the masked blocks, and this is not needed."""
    if getattr(model, "prefix_shared_attention", False):
        return model
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module._attention_call = _with_prefix_shared_groups(module._attention_call)
    model.prefix_shared_attention = True  # what model_inputs asks
    return model


def _with_prefix_shared_groups(default: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def attention_call(q: Tensor, k: Tensor, v: Tensor, mask: Any, dropout_p: float, is_causal: bool) -> Tensor:
        if isinstance(mask, PrefixSharedGroups):
            if dropout_p > 0.0:
                raise ValueError("attention dropout is not supported with packed batches (set attn_dropout=0)")
            return prefix_shared_attention(q, k, v, mask)
        return default(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)

    return attention_call


def model_inputs(batch: dict[str, Tensor], model: Optional[nn.Module] = None) -> dict[str, Any]:
    """Keyword arguments of a torchtune decoder's forward for this batch: none for padded rows (causal
    attention), the prefix-sharing mask and position ids for packed ones: a flex-attention BlockMask on CUDA,
    the groups' spans for a ``model`` whose attention takes them (:func:`enable_prefix_shared_attention`, CPU),
    else a dense boolean mask."""
    if "segment_ids" not in batch:
        return {}
    group_ids, segment_ids = batch["group_ids"], batch["segment_ids"]
    if flex_attention_on(group_ids.device):
        mask = prefix_sharing_block_mask(group_ids, segment_ids)
    elif getattr(model, "prefix_shared_attention", False):
        mask = PrefixSharedGroups(group_ids, segment_ids)
    else:
        mask = prefix_sharing_mask(group_ids, segment_ids)
    return {"mask": mask, "input_pos": batch["input_pos"]}


def packed_collator(
    *, pad_id: int, device: torch.device, model_max_seq_len: int, longest: int, max_row_tokens: Optional[int] = None
) -> Callable[[list], dict[str, Tensor]]:
    """:func:`rao_tune.data.collate_packed_batch` with a row budget that holds ``longest`` (the longest prompt +
    response to come) and fits the model: ``max_row_tokens``, or by default 4096 tokens (more if ``longest``
    needs it, less if the model's ``max_seq_len`` is shorter). On CUDA with flex attention every row is padded to
    exactly the budget: torchtune compiles flex attention for static shapes, and each new shape would recompile.
    """
    budget = max_row_tokens or min(max(DEFAULT_MAX_ROW_TOKENS, longest), model_max_seq_len)
    if not longest <= budget <= model_max_seq_len:
        raise ValueError(
            f"max_row_tokens={budget} must hold the longest prompt + response of the data ({longest} tokens) and "
            f"fit the model's max_seq_len ({model_max_seq_len})"
        )
    return partial(collate_packed_batch, pad_id=pad_id, max_row_tokens=budget, fixed_width=flex_attention_on(device))
