"""A value network trained together with the policy: DRO's V(x) and PPO's critic.

The value model is any scalar-head model of :func:`rao_tune.models.reward_model` (e.g. a copy of the reward
model, or a small decoder of its own), built from its own ``*_model`` / ``*_checkpointer`` config entries onto
FSDP2 like the policy. It reads the same batch as the policy (either layout of :mod:`rao_tune.data.collate`), so
a value is the head's output at a position: V(x) at the prompt's last token, V(state) at any scored position.

:class:`PolicyAndValue` holds both, so that one optimizer (the value model in a parameter group of its own, with
its own learning rate), one gradient clip and one step checkpoint cover them (trl's PPO holds policy and value
the same way); the policy alone is exported.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config, training

from rao_tune.models import last_token_scores
from rao_tune.training.attention import model_inputs
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.preflight import check_checkpoint_matches_model


class PolicyAndValue(nn.Module):
    """The modules one optimizer trains: ``policy`` and ``value`` (state-dict keys ``policy.*``, ``value.*``)."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy, self.value = policy, value

    def param_groups(self, value_lr: Optional[float]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the policy's trainable parameters at the configured lr, the value
        model's at ``value_lr`` (None: the same lr)."""
        value_group: dict[str, Any] = {"params": [p for p in self.value.parameters() if p.requires_grad], "name": "value"}
        if value_lr is not None:
            value_group["lr"] = float(value_lr)
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad]}, value_group]


def build_scalar_head_model(
    cfg_model: DictConfig, cfg_checkpointer: DictConfig, *, what: str, activation_checkpointing: bool,
    trainable: bool = True, **model_options: Any,
) -> nn.Module:
    """The scalar-head model of ``cfg_model`` with the weights of ``cfg_checkpointer`` on FSDP2 (``what`` names
    the config entry in errors). Its checkpoint's ``config.json`` is checked against the model first."""
    if cfg_model is None or cfg_checkpointer is None:
        raise ValueError(f"{what}_model and {what}_checkpointer must both be set in the config")
    with training.set_default_dtype(model_options["dtype"]), torch.device("meta"):
        check_checkpoint_matches_model(cfg_checkpointer, config.instantiate(cfg_model))
    checkpoint = config.instantiate(cfg_checkpointer, should_load_recipe_state=False).load_checkpoint()
    return setup_fsdp_model(cfg_model, checkpoint[training.MODEL_KEY], activation_checkpointing=activation_checkpointing,
                            trainable=trainable, **model_options)


def head_outputs(model: nn.Module, batch: dict[str, Tensor], positions: Tensor) -> Tensor:
    """``[P]`` fp32 outputs of a scalar-head model at the flat ``positions`` (row * S + column) of the batch."""
    return last_token_scores(model(batch["tokens"], **model_inputs(batch, model)), positions)


def prompt_values(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """V(x) of each response's prompt, ``[N]``: the value head at the prompt's last token, from one forward pass
    over the batch's prompts alone (``prompt_rows``): a prompt is read once, and no response token is."""
    return head_outputs(model, {"tokens": batch["prompt_rows"]}, batch["prompt_last_positions"])
