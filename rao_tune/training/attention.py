"""Attention masks for packed, prefix-shared rows (:func:`rao_tune.data.collate_packed_batch`).

A token may attend to an earlier token of the same row when both belong to the same prompt group and the earlier
one is a prompt token or belongs to the same response: every response sees its prompt and itself, never a
sibling response and never another group. On CUDA (compute capability >= 7.5) the rule becomes a flex-attention
``BlockMask``, which skips the masked blocks; elsewhere a dense boolean mask goes to SDPA.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import Tensor

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


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Any]:
    """Keyword arguments of a torchtune decoder's forward for this batch: none for padded rows (causal
    attention), the prefix-sharing mask and position ids for packed ones."""
    if "segment_ids" not in batch:
        return {}
    group_ids, segment_ids = batch["group_ids"], batch["segment_ids"]
    if flex_attention_on(group_ids.device):
        mask = prefix_sharing_block_mask(group_ids, segment_ids)
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
