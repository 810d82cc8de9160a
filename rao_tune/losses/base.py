"""The one call signature every loss module shares, so a recipe never special-cases a loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn


@dataclass
class ResponseLogProbs:
    """Everything a preference loss may read about a batch of N responses to B prompts (all ``[N]``).

    ``reference_logps`` and ``reference_prompt_logps`` are None when the loss needs no reference model;
    ``values`` (a value network's V(x) of each response's prompt) is None unless the loss needs a value model.
    """

    policy_logps: Tensor
    policy_prompt_logps: Tensor
    reference_logps: Optional[Tensor]
    reference_prompt_logps: Optional[Tensor]
    rewards: Tensor
    prompt_ids: Tensor
    response_lengths: Tensor
    values: Optional[Tensor] = None


@dataclass
class LossOutput:
    """A scalar loss, and the loss's own implicit reward of each response (detached, ``[N]``) for metrics."""

    loss: Tensor
    implicit_rewards: Tensor


class PreferenceLoss(nn.Module):
    """Base class: ``forward(batch: ResponseLogProbs) -> LossOutput``.

    ``needs_reference`` tells the recipe whether to load and run a reference model at all;
    ``needs_value_model`` whether to build and train a value network V(x) with the policy (DRO).
    ``check_data`` sees each training prompt's rewards before any model loads and refuses data the loss cannot
    learn from (e.g. a pairwise loss over prompts that give no pair).
    ``calibrate`` sees every reward of the training set once before training (e.g. to pick a
    data-dependent constant) and returns the values it chose, for the log.
    """

    needs_reference: bool = True
    needs_value_model: bool = False

    def check_data(self, prompt_rewards: Sequence[Sequence[float]]) -> None:
        return None

    def calibrate(self, dataset_rewards: Tensor) -> dict[str, float]:
        return {}

    def forward(self, batch: ResponseLogProbs) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def require(loss: object, condition: bool, message: str) -> None:
    """Refuse a loss hyperparameter out of range at construction, before any model loads."""
    if not condition:
        raise ValueError(f"{type(loss).__name__}: {message}")
