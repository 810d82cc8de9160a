"""The optimizer step inside backward (torchtune's ``optimizer_in_bwd``), for any configured optimizer.

Each trainable parameter gets its own optimizer (the configured ``_component_`` with the configured
arguments), stepped by a post-accumulate-grad hook the moment backward has finished that parameter's gradient,
which is then freed. The whole model's gradients never exist at once, so peak memory loses them (4 bytes per
trained parameter in fp32, 2 in bf16). The update is the configured optimizer's, parameter by parameter: AdamW,
which treats each element on its own, gives the same weights as one AdamW over the whole model, up to float
rounding (its fused/foreach kernels group the arithmetic differently). Not possible with it: gradient
clipping (it needs every gradient's norm before any update) and gradient accumulation (a parameter would step
after each micro-batch).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn


class OptimizerInBackward(torch.optim.Optimizer):
    """Looks like one optimizer to the train loop, the LR schedule and the step checkpoint:

    - ``param_groups`` are the configured groups (an LR schedule sets their ``lr``; each parameter's optimizer
      takes its group's current options when it steps);
    - ``step`` and ``zero_grad`` do nothing: the updates happened in backward, the gradients are gone;
    - ``optimizers`` (one per parameter) are what a DCP checkpoint saves and loads.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]):
        # Not Optimizer.__init__: this object holds no state of its own (hence no ``state`` entries).
        self.param_groups = [dict(group, params=list(group["params"])) for group in param_groups]
        self.defaults, self.state = {}, {}
        self.optimizers: list[torch.optim.Optimizer] = []
        for index, group in enumerate(self.param_groups):
            if not group["params"]:
                raise ValueError(f"optimizer_in_bwd: parameter group {group.get('name', index)} has no parameters")
            options = {key: value for key, value in group.items() if key not in ("params", "name")}
            group_optimizers = [make_optimizer([{"params": [param], **options}]) for param in group["params"]]
            for param, optimizer in zip(group["params"], group_optimizers):
                param.register_post_accumulate_grad_hook(self._step_hook(optimizer, group))
            self.optimizers += group_optimizers
            # The group's options as its optimizers completed them (lr, betas, ...), as a plain optimizer's are.
            for key, value in group_optimizers[0].param_groups[0].items():
                group.setdefault(key, value)

    @staticmethod
    def _step_hook(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> Callable[[nn.Parameter], None]:
        def step_now(param: nn.Parameter) -> None:
            # Where the schedule put the group's options (lr; momentum or betas for cyclic schedules).
            optimizer.param_groups[0].update((key, value) for key, value in group.items() if key not in ("params", "name"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step_now

    def step(self, closure: Any = None) -> None:
        """The updates were made in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The gradients were freed in backward."""

    def __repr__(self) -> str:
        return f"OptimizerInBackward({len(self.optimizers)} x {type(self.optimizers[0]).__name__})"


def checkpointed_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers whose state a step checkpoint holds: one per parameter for :class:`OptimizerInBackward`
    (DCP's ``get_state_dict`` / ``set_state_dict`` take a list), else the optimizer itself."""
    return list(getattr(optimizer, "optimizers", [optimizer]))
