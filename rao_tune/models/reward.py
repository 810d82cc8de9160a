"""Scalar reward models from any torchtune decoder builder: the decoder with a one-output head.

torchtune 0.6.1 has classifier builders for llama2 and mistral only; this one wraps any decoder builder
(llama3, qwen2.5, EuroLLM, ...), so a reward model always matches the architecture of its policy.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn


def _resolve(builder: Union[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if callable(builder):
        return builder
    module_path, _, name = builder.rpartition(".")
    if not module_path:
        raise ValueError(f"decoder must be a dotted path such as torchtune.models.llama3.llama3_8b, got {builder!r}")
    return getattr(importlib.import_module(module_path), name)


class ScoreHead(nn.Linear):
    """``nn.Linear(embed_dim, 1, bias=False)`` computed in fp32: a bf16 output would round rewards to steps of
    1/16 near |r| = 8, creating false ties between responses. Same parameter name and shape as a linear layer."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim, 1, bias=False)

    def forward(self, hidden: Tensor) -> Tensor:
        return nn.functional.linear(hidden.float(), self.weight.float())


def reward_model(decoder: Union[str, Callable[..., nn.Module]], **decoder_kwargs: Any) -> nn.Module:
    """``decoder(**decoder_kwargs)`` with its vocabulary projection replaced by a one-output :class:`ScoreHead`
    (no bias, as HF's ``*ForSequenceClassification.score``; computed in fp32). The model returns ``[batch, seq, 1]``; read the
    reward at each response's last token with :func:`last_token_scores`.

    YAML::

        model:
          _component_: rao_tune.models.reward_model
          decoder: torchtune.models.llama3.llama3_8b
    """
    model = _resolve(decoder)(**decoder_kwargs)
    embed_dim = model.tok_embeddings.embedding_dim
    # Tied decoders (small Qwen2.5) project through the embedding; the score head is a separate, untied weight.
    model.output = ScoreHead(embed_dim)
    return model


def init_score_head(hidden_size: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh score head ``[1, hidden_size]`` drawn from N(0, 1/(hidden_size + 1)) with its own generator,
    so the same seed gives the same head whatever else consumed the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.randn(1, hidden_size, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size + 1)
    return head.to(dtype)


def last_token_scores(outputs: Tensor, last_positions: Tensor) -> Tensor:
    """The reward of each response: the head's output at its last token. ``outputs`` is ``[R, S, 1]`` (or a list
    of sequence chunks) over rows of either batch layout, ``last_positions`` ``[N]`` the flat index
    (row * S + column) of each response's last token (the collators' ``last_positions``); returns fp32 ``[N]``."""
    if isinstance(outputs, list):
        outputs = torch.cat(outputs, dim=1)
    return outputs.reshape(-1)[last_positions.to(outputs.device)].float()
