"""Attention masks for packed, prefix-shared rows (:func:`rao_tune.data.collate_packed_batch`).

A token may attend to an earlier token of the same row when both belong to the same prompt group and the earlier
one is a prompt token or belongs to the same response: every response sees its prompt and itself, never a
sibling response and never another group. On CUDA (compute capability >= 7.5) the rule becomes a flex-attention
``BlockMask``, which skips the masked blocks; elsewhere a dense boolean mask goes to SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION


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
    if group_ids.device.type == "cuda" and _SUPPORTS_FLEX_ATTENTION:
        mask = prefix_sharing_block_mask(group_ids, segment_ids)
    else:
        mask = prefix_sharing_mask(group_ids, segment_ids)
    return {"mask": mask, "input_pos": batch["input_pos"]}
