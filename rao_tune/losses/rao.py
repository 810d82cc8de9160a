"""The RAO loss module, as configured from YAML (``_component_: rao_tune.losses.RAOLoss``)."""

from __future__ import annotations

import logging
from typing import Union

from torch import Tensor

from rao_tune.losses.base import LossOutput, PreferenceLoss, ResponseLogProbs, require
from rao_tune.losses.functional import rao_implicit_rewards, rao_loss

log = logging.getLogger(__name__)


class RAOLoss(PreferenceLoss):
    """Reward Alignment Optimization (RAO paper, Algorithm 1).

        r_theta(x, y) = beta * log(pi/pi_ref)(y|x) + beta * (z0 + sg(log(pi/pi_ref)(x - t0 | t0)))
        L = mean_x mean_{y of x} (r(x, y) - r_theta(x, y))^2

    Args:
        beta: KL strength; smaller beta widens the gaps between the targets of log pi(y|x).
        z0: log Z_0, the normaliser of the universal prefix t0 (paper: 50). ``"auto"`` sets
            ``z0 = mean(training rewards) / beta``, so an average response starts exactly on its target
            and keeps its probability.
    """

    def __init__(self, beta: float = 0.1, z0: Union[float, str] = 50.0):
        super().__init__()
        require(self, beta > 0, f"beta must be > 0, got {beta}")
        if isinstance(z0, str) and z0 != "auto":
            raise ValueError(f"RAOLoss: z0 must be a number or 'auto', got {z0!r}")
        self.beta = float(beta)
        self.z0 = z0 if z0 == "auto" else float(z0)

    def calibrate(self, dataset_rewards: Tensor) -> dict[str, float]:
        if self.z0 != "auto":
            return {}
        self.z0 = float(dataset_rewards.double().mean()) / self.beta
        log.info("RAOLoss: z0=auto -> log Z_0 = mean reward / beta = %.6g", self.z0)
        return {"z0": self.z0}

    def forward(self, batch: ResponseLogProbs) -> LossOutput:
        if self.z0 == "auto":
            raise RuntimeError("RAOLoss(z0='auto') must be calibrated on the training rewards first")
        args = (batch.policy_logps, batch.reference_logps, batch.policy_prompt_logps, batch.reference_prompt_logps)
        loss = rao_loss(*args, batch.rewards, batch.prompt_ids, beta=self.beta, z0=self.z0)
        implicit_rewards = rao_implicit_rewards(*args, beta=self.beta, z0=self.z0).detach()
        return LossOutput(loss=loss, implicit_rewards=implicit_rewards)
