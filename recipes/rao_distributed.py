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
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training, utils
from tqdm import tqdm

from rao_tune.data import collate_reward_batch
from rao_tune.losses import LossOutput, PreferenceLoss, ResponseLogProbs
from rao_tune.training.checkpoint import check_resume_state, instantiate_checkpointer, save_epoch_checkpoint
from rao_tune.training.distributed import all_reduce_sum, init_distributed
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.metrics import add_statistics, finalize_preference_metrics, memory_stats, preference_statistics
from rao_tune.training.model import setup_fsdp_model

log = utils.get_logger("INFO")


class RAORecipeDistributed:
    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        self.world_size, self.rank = init_distributed(self._device)
        self._is_rank_zero = self.rank == 0

        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = cfg.epochs
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch", None)
        self._gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._log_every_n_steps = cfg.get("log_every_n_steps", 1)
        self._resume_from_checkpoint = cfg.resume_from_checkpoint
        self.epochs_run = 0
        self.global_step = 0

    # ------------------------------------------------------------------ setup
    def setup(self, cfg: DictConfig) -> None:
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)

        self._checkpointer = instantiate_checkpointer(cfg.checkpointer, resume=self._resume_from_checkpoint)
        checkpoint = self._checkpointer.load_checkpoint()
        if self._resume_from_checkpoint:
            self.epochs_run = check_resume_state(
                checkpoint, seed=self.seed, total_epochs=self.total_epochs, max_steps_per_epoch=self.max_steps_per_epoch
            )

        model_options = dict(
            device=self._device,
            dtype=self._dtype,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            cpu_offload=cfg.get("fsdp_cpu_offload", False),
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
        )
        self._model = setup_fsdp_model(
            cfg.model,
            checkpoint[training.MODEL_KEY],
            activation_checkpointing=cfg.enable_activation_checkpointing,
            **model_options,
        )
        self._model.set_num_output_chunks(cfg.get("num_output_chunks", 8))

        self._loss_fn: PreferenceLoss = config.instantiate(cfg.loss)
        self._ref_model = None
        if self._loss_fn.needs_reference:
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

        self._sampler = DistributedSampler(
            self._dataset, num_replicas=self.world_size, rank=self.rank, shuffle=cfg.shuffle, seed=self.seed
        )
        self._dataloader = DataLoader(
            self._dataset,
            batch_size=cfg.batch_size,
            sampler=self._sampler,
            drop_last=True,  # every rank and micro-batch holds batch_size prompts: means of means stay exact
            collate_fn=partial(collate_reward_batch, pad_id=self._tokenizer.pad_id),
        )
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has no optimizer step: {len(self._dataset)} prompts, batch_size={cfg.batch_size}, "
                f"{self.world_size} processes, gradient_accumulation_steps={self._gradient_accumulation_steps}"
            )
        self.global_step = self.epochs_run * self._steps_per_epoch

        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        if self._resume_from_checkpoint:
            training.load_from_full_optimizer_state_dict(
                self._model, self._optimizer, checkpoint[training.OPT_KEY], self._device
            )
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler,
            self._optimizer,
            num_training_steps=self.total_epochs * self._steps_per_epoch,
            last_epoch=self.global_step - 1,
        )
        utils.log_rank_zero(
            log,
            f"{len(self._dataset)} prompts, {self._steps_per_epoch} steps per epoch, {self.world_size} processes, "
            f"reference model: {'yes' if self._ref_model is not None else 'no (reference-free loss)'}",
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
            self._sampler.set_epoch(epoch)  # a different, reproducible shuffle each epoch
            progress = tqdm(total=self._steps_per_epoch, disable=not self._is_rank_zero, desc=f"epoch {epoch + 1}")
            step_sums: dict[str, float] = {}
            step_start = time.perf_counter()
            for micro_step, batch in enumerate(self._dataloader):
                if micro_step // self._gradient_accumulation_steps >= self._steps_per_epoch:
                    break
                batch = {key: value.to(self._device) for key, value in batch.items()}
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
                if (micro_step + 1) % self._gradient_accumulation_steps != 0:
                    continue

                totals = all_reduce_sum(step_sums, self._device)
                loss = totals["loss"] / (self._gradient_accumulation_steps * self.world_size)
                grad_norm = None
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), float(self._clip_grad_norm))
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                self._stop_if_not_finite(loss, grad_norm, epoch)
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1

                if self._is_rank_zero and self.global_step % self._log_every_n_steps == 0:
                    elapsed = time.perf_counter() - step_start
                    metrics = {
                        "loss": loss,
                        "lr": training.get_lr(self._optimizer),
                        "tokens_per_second": totals["tokens"] / elapsed,
                        "step_time": elapsed,
                        **finalize_preference_metrics(totals),
                        **memory_stats(self._device),
                    }
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4g}")
                step_sums = {}
                step_start = time.perf_counter()
            progress.close()

            self.epochs_run += 1
            save_epoch_checkpoint(
                self._checkpointer,
                self._model,
                self._optimizer,
                epoch=epoch,
                total_epochs=self.total_epochs,
                recipe_state={
                    training.SEED_KEY: self.seed,
                    training.EPOCHS_KEY: self.epochs_run,
                    training.TOTAL_EPOCHS_KEY: self.total_epochs,
                    training.MAX_STEPS_KEY: self.max_steps_per_epoch,
                },
                device=self._device,
                is_rank_zero=self._is_rank_zero,
            )

    def _stop_if_not_finite(self, loss: float, grad_norm: torch.Tensor | None, epoch: int) -> None:
        """Stop before a non-finite update reaches the weights; the last saved epoch stays intact.
        ``loss`` is already summed over ranks, so every rank takes the same decision."""
        bad_grad = grad_norm is not None and not torch.isfinite(grad_norm).item()
        if torch.isfinite(torch.tensor(loss)) and not bad_grad:
            return
        what = f"loss is {loss}" if not torch.isfinite(torch.tensor(loss)) else f"gradient norm is {float(grad_norm)}"
        raise FloatingPointError(
            f"Stopping: the {what} at step {self.global_step + 1} (epoch {epoch + 1}); no update was applied. "
            f"The last good checkpoint is the latest epoch_* folder in the output_dir (if any epoch finished). "
            "Lower the learning rate, check the rewards' scale against beta and z0, or use dtype=fp32."
        )

    def cleanup(self) -> None:
        if self._is_rank_zero:
            self._metric_logger.close()
        dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = RAORecipeDistributed(cfg=cfg)
    config.log_config(recipe_name="RAORecipeDistributed", cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
