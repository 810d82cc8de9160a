"""Building a torchtune model from config onto FSDP2, with activation checkpointing and a full state dict;
a model built by a LoRA builder gets its adapters (see :mod:`rao_tune.training.lora`) and a frozen base."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torchtune import config, modules, training

from rao_tune.training.attention import enable_prefix_shared_attention
from rao_tune.training.lora import freeze_all_but_adapters, initial_adapter_state, lora_settings

log = logging.getLogger(__name__)


def quantize_base(cfg_model: DictConfig) -> bool:
    """Whether the config builds a QLoRA model (its frozen base in NF4)."""
    return bool(cfg_model.get("quantize_base", False))


def setup_fsdp_model(
    cfg_model: DictConfig,
    state_dict: dict[str, Any],
    *,
    device: torch.device,
    dtype: torch.dtype,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    custom_sharded_layers: Optional[list[str]] = None,
    trainable: bool = True,
    compile: bool = False,
    adapter_seed: int = 0,
) -> nn.Module:
    """Instantiate ``cfg_model`` on the meta device, shard it with FSDP2 and load ``state_dict`` into the shards.

    Building on meta and loading shard by shard keeps every rank's peak memory at one shard of the model.
    A non-trainable model (the frozen reference) gets no activation checkpointing and no gradients.
    ``compile`` compiles each decoder layer with ``torch.compile`` (torchtune's per-layer compile; the first
    steps then take minutes, so it stays off on CPU and in tests).

    A LoRA model (``cfg_model`` names a LoRA builder) loads ``state_dict`` as its base, starts its adapters from
    ``adapter_seed`` and trains only them (and a reward model's new score head).
    """
    # torch 2.13's FSDP2 one-process path hands a tensor subclass only the first of its all-gather inputs, so
    # NF4 weights (three inputs) fail in their first forward. One process has nothing to shard: a QLoRA model
    # there is built on its device and loaded in place (copying into an NF4 weight quantizes it).
    unsharded = quantize_base(cfg_model) and not (dist.is_initialized() and dist.get_world_size() > 1)
    with training.set_default_dtype(dtype), (device if unsharded else torch.device("meta")):
        model = config.instantiate(cfg_model)
    if lora_settings(model) is not None:
        state_dict = {**state_dict, **initial_adapter_state(model, adapter_seed)}
        freeze_all_but_adapters(model)
    if compile:
        training.compile_model(model, verbose=False)

    if activation_checkpointing and trainable:
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})

    if unsharded:
        model.load_state_dict(state_dict, strict=True)
    else:
        shard_conditions = [partial(training.get_shard_conditions, names_to_match=custom_sharded_layers)]
        training.shard_model(
            model=model,
            shard_conditions=shard_conditions,
            cpu_offload=cpu_offload,
            reshard_after_forward=reshard_after_forward,
        )
        with training.set_default_dtype(dtype), device:
            for module in model.modules():
                if hasattr(module, "rope_init"):  # RoPE buffers are not in the state dict
                    module.rope_init()
        training.load_from_full_model_state_dict(model, state_dict, device, strict=True, cpu_offload=cpu_offload)
    training.validate_no_params_on_meta_device(model)
    # Dropout would make policy and reference log-probs of the same sequence disagree at step 0.
    training.disable_dropout(model)
    if device.type == "cpu":  # packed rows: attention over the allowed blocks, not a dense mask (CUDA: flex)
        enable_prefix_shared_attention(model)
    if lora_settings(model) is not None:  # loading keeps requires_grad; set again in case a torch version does not
        freeze_all_but_adapters(model)
    if not trainable:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    return model
