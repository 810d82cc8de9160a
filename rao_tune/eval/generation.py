"""Loading a checkpoint for inference, and batched generation with a KV cache (torchtune's ``generate``)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training, utils
from torchtune.generation import generate
from torchtune.modules.common_utils import local_kv_cache

from rao_tune.models.checkpoint_files import with_checkpoint_files


def load_for_inference(
    cfg_model: DictConfig, cfg_checkpointer: DictConfig, cfg_tokenizer: DictConfig, *, device: str, dtype: str
) -> tuple[nn.Module, Any, torch.device, torch.dtype]:
    """Model (weights from the HF checkpoint, eval mode, no grads), tokenizer, device and dtype from config. A
    checkpointer config without ``checkpoint_files`` reads those found in its ``checkpoint_dir``."""
    torch_device = utils.get_device(device=device)
    torch_dtype = training.get_dtype(dtype, device=torch_device)
    with training.set_default_dtype(torch_dtype), torch_device:
        model = config.instantiate(cfg_model)
    state_dict = config.instantiate(with_checkpoint_files(cfg_checkpointer)).load_checkpoint()[training.MODEL_KEY]
    model.load_state_dict(state_dict)
    model.eval().requires_grad_(False)
    return model, config.instantiate(cfg_tokenizer), torch_device, torch_dtype


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a turn: torchtune tokenizers' ``stop_tokens``, else their ``eos_id``."""
    return list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])


def left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[len(sequences), longest]`` token ids, each sequence right-aligned after ``pad_id`` padding: a batch of
    prompts whose continuations all start at the same column."""
    longest = max(len(sequence) for sequence in sequences)
    batch = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, longest - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
    return batch


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens``; return only the new tokens, cut before the
    first stop token. ``temperature == 0`` is greedy decoding (the paper's setting). Prompts are left-padded in
    batches of similar length; each batch runs with its own KV cache. ``progress`` is called with each finished
    batch's number of prompts (e.g. a progress bar's ``update``)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    rng = torch.Generator(device=device).manual_seed(seed)
    stops = set(stop_tokens)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = left_padded([prompts[i] for i in indices], pad_id)
        longest = batch.shape[1]
        with local_kv_cache(model, batch_size=len(indices), device=device, dtype=dtype,
                            decoder_max_seq_len=longest + max_new_tokens):
            tokens, _ = generate(
                model, batch.to(device), max_generated_tokens=max_new_tokens, pad_id=pad_id,
                temperature=temperature if temperature > 0 else 1.0, top_k=top_k if temperature > 0 else 1,
                stop_tokens=list(stops), rng=rng,
            )
        for row, i in enumerate(indices):
            new = tokens[row, longest:].tolist()
            cut = next((position for position, token in enumerate(new) if token in stops), len(new))
            outputs[i] = new[:cut]
        if progress is not None:
            progress(len(indices))
    return outputs
