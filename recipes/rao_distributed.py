"""Full-parameter preference alignment with RAO (or any rao_tune loss) on torchtune's FSDP2 stack.

    tune run --nproc_per_node 8 recipes/rao_distributed.py --config configs/llama3_8b_rao.yaml loss.beta=0.1 loss.z0=50

Reads top to bottom: ``setup`` builds policy, frozen reference (only if the loss needs one), tokenizer,
reward-annotated data, optimizer and LR schedule from the config; ``train`` is the loop. Each step runs one
forward pass per model over every response of the batch's prompts, turns it into per-sequence log-probs of
the response and of the prompt after t0, and hands them to the loss module, whatever loss it is.
Runs on CPU (gloo) and CUDA (nccl) from the same code.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from rao_tune.losses import LossOutput, PreferenceLoss, ResponseLogProbs
from rao_tune.training.checkpoint import instantiate_checkpointer
from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.metrics import add_statistics, finalize_preference_metrics, preference_statistics
from rao_tune.training.model import setup_fsdp_model
from rao_tune.training.recipe_base import DistributedRecipe, run_recipe

log = utils.get_logger("INFO")


class RAORecipeDistributed(DistributedRecipe):
    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        checkpoint = self.setup_logger_and_checkpoint(cfg)
        model_options = self.model_options(cfg)
        self._model = setup_fsdp_model(
            cfg.model,
            checkpoint[training.MODEL_KEY],
            activation_checkpointing=cfg.enable_activation_checkpointing,
            **model_options,
        )
        self._model.set_num_output_chunks(cfg.get("num_output_chunks", 8))

        self._loss_fn: PreferenceLoss = config.instantiate(cfg.loss)
        self._ref_model = None
        # A reference-free loss runs without one, unless asked to log true log-ratios for comparison with others.
        if self._loss_fn.needs_reference or cfg.get("monitor_with_reference", False):
            self._ref_model = setup_fsdp_model(
                cfg.model, self._reference_state_dict(cfg, checkpoint), trainable=False, **model_options
            )
            self._ref_model.set_num_output_chunks(cfg.get("num_output_chunks", 8))
        del checkpoint[training.MODEL_KEY]

        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._dataset = config.instantiate(cfg.dataset, self._tokenizer)
        for name, value in self._loss_fn.calibrate(self._dataset.all_rewards()).items():
            utils.log_rank_zero(log, f"loss calibrated on the training rewards: {name} = {value:.6g}")
            if self._is_rank_zero:
                self._metric_logger.log(f"calibrated/{name}", value, step=0)

        self.setup_data_and_optimizer(cfg, self._model, checkpoint)
        if self._ref_model is None:
            reference = "none (reference-free loss: logratio_* metrics are log pi, not log pi/pi_ref)"
        else:
            reference = "yes" if self._loss_fn.needs_reference else "for metrics only (monitor_with_reference)"
        utils.log_rank_zero(
            log,
            f"{len(self._dataset)} prompts, {self._steps_per_epoch} steps per epoch, {self.world_size} processes, "
            f"reference model: {reference}",
        )

    def _reference_state_dict(self, cfg: DictConfig, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """The frozen reference: ``ref_checkpointer`` if configured, else the policy's starting checkpoint
        (re-read when resuming, since the policy then starts from a trained epoch)."""
        if "ref_checkpointer" in cfg and cfg.ref_checkpointer is not None:
            ref_checkpointer = config.instantiate(cfg.ref_checkpointer, should_load_recipe_state=False)
        elif self._resume_from_checkpoint:
            ref_checkpointer = instantiate_checkpointer(cfg.checkpointer, resume=False)
        else:
            return checkpoint[training.MODEL_KEY]
        return ref_checkpointer.load_checkpoint()[training.MODEL_KEY]

    # ------------------------------------------------------------------ one micro-batch
    def _loss_step(self, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, ResponseLogProbs]:
        policy_logps, policy_prompt_logps = sequence_logps(self._model, batch)
        reference_logps = reference_prompt_logps = None
        if self._ref_model is not None:
            with torch.no_grad():
                reference_logps, reference_prompt_logps = sequence_logps(self._ref_model, batch)
        logps = ResponseLogProbs(
            policy_logps=policy_logps,
            policy_prompt_logps=policy_prompt_logps,
            reference_logps=reference_logps,
            reference_prompt_logps=reference_prompt_logps,
            rewards=batch["rewards"],
            prompt_ids=batch["prompt_ids"],
            response_lengths=batch["response_lengths"],
        )
        return self._loss_fn(logps), logps

    # ------------------------------------------------------------------ train loop
    def train(self) -> None:
        self._optimizer.zero_grad()
        for epoch in range(self.epochs_run, self.total_epochs):
            progress = self.progress_bar(epoch)
            step_sums: dict[str, float] = {}
            step_start = time.perf_counter()
            for micro_step, batch in self.micro_batches(epoch):
                output, logps = self._loss_step(batch)
                (output.loss / self._gradient_accumulation_steps).backward()

                log_ratios = logps.policy_logps.detach()
                if logps.reference_logps is not None:
                    log_ratios = log_ratios - logps.reference_logps
                step_sums = add_statistics(
                    step_sums,
                    {
                        "loss": output.loss.item(),
                        "tokens": float(batch["prompt_mask"].sum() + batch["response_mask"].sum() + len(log_ratios)),
                        **preference_statistics(output.implicit_rewards, log_ratios, logps.rewards, logps.prompt_ids),
                    },
                )
                if not self.closes_step(micro_step):
                    continue

                totals = all_reduce_sum(step_sums, self._device)
                loss = totals["loss"] / (self._gradient_accumulation_steps * self.world_size)
                metrics = {"loss": loss, **finalize_preference_metrics(totals)}
                self.finish_step(self._model, loss=loss, metrics=metrics, tokens=totals["tokens"], epoch=epoch,
                                 progress=progress, started=step_start)
                step_sums, step_start = {}, time.perf_counter()
            progress.close()

            self.save_checkpoint(self._model, epoch)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    run_recipe(RAORecipeDistributed, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
