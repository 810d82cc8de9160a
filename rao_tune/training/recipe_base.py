"""What every training recipe of rao_tune does the same way, so the recipe files hold only what is theirs:
process group and seed, metric logger, checkpoint loading and resume checks, FSDP2 model set-up, data loader,
optimizer and schedule, the guarded optimizer step, per-step system metrics and the epoch checkpoint."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset
from torchtune import config, training, utils
from tqdm import tqdm

from rao_tune.data import collate_reward_batch, longest_sequence
from rao_tune.training.attention import packed_collator
from rao_tune.training.checkpoint import check_resume_state, instantiate_checkpointer, save_epoch_checkpoint
from rao_tune.training.distributed import init_distributed
from rao_tune.training.loop import (
    STEPS_PER_EPOCH_KEY,
    build_dataloader,
    guarded_optimizer_step,
    recipe_state,
    setup_optimizer,
    steps_per_epoch,
)
from rao_tune.training.metrics import memory_stats

log = logging.getLogger(__name__)


class DistributedRecipe:
    """Base of the recipes: subclasses write ``setup`` (calling the ``setup_*`` helpers in order) and ``train``."""

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

    def setup_logger_and_checkpoint(self, cfg: DictConfig) -> dict[str, Any]:
        """Metric logger (rank 0), then the starting checkpoint: the configured one, or with
        ``resume_from_checkpoint=True`` the last finished epoch with its optimizer and recipe state."""
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
        self._checkpointer = instantiate_checkpointer(cfg.checkpointer, resume=self._resume_from_checkpoint)
        checkpoint = self._checkpointer.load_checkpoint()
        if self._resume_from_checkpoint:
            self.epochs_run = check_resume_state(
                checkpoint, seed=self.seed, total_epochs=self.total_epochs, max_steps_per_epoch=self.max_steps_per_epoch
            )
        return checkpoint

    def model_options(self, cfg: DictConfig) -> dict[str, Any]:
        """Keyword arguments of :func:`rao_tune.training.model.setup_fsdp_model` from the config."""
        return dict(
            device=self._device,
            dtype=self._dtype,
            reshard_after_forward=cfg.get("fsdp_reshard_after_forward", True),
            cpu_offload=cfg.get("fsdp_cpu_offload", False),
            custom_sharded_layers=cfg.get("custom_sharded_layers", None),
            compile=cfg.get("compile", False),
        )

    def batch_collator(
        self, cfg: DictConfig, model: nn.Module, *datasets: Optional[Dataset]
    ) -> Callable[[list], dict[str, torch.Tensor]]:
        """How prompts with their responses become a micro-batch: packed and prefix-shared (``pack_responses``,
        the default: each prompt once, rows of at most ``max_row_tokens``) or one right-padded row per response.
        The row budget is checked against ``datasets`` here, before any step: a batch failing later on one rank
        would leave the others waiting in a collective."""
        if not cfg.get("pack_responses", True):
            return partial(collate_reward_batch, pad_id=self._tokenizer.pad_id)
        return packed_collator(
            pad_id=self._tokenizer.pad_id,
            device=self._device,
            model_max_seq_len=model.max_seq_len,
            longest=max(longest_sequence(dataset) for dataset in datasets if dataset is not None),
            max_row_tokens=cfg.get("max_row_tokens", None),
        )

    def setup_data_and_optimizer(
        self, cfg: DictConfig, model: nn.Module, checkpoint: dict[str, Any], collate_fn: Callable
    ) -> None:
        """Loader over ``self._dataset`` (batches made by ``collate_fn``), steps per epoch, and the optimizer and
        schedule of ``model``."""
        self._sampler, self._dataloader = build_dataloader(
            self._dataset,
            batch_size=cfg.batch_size,
            world_size=self.world_size,
            rank=self.rank,
            shuffle=cfg.shuffle,
            seed=self.seed,
            collate_fn=collate_fn,
        )
        self._steps_per_epoch = steps_per_epoch(
            len(self._dataloader),
            gradient_accumulation_steps=self._gradient_accumulation_steps,
            max_steps_per_epoch=self.max_steps_per_epoch,
            explain=f"{len(self._dataset)} examples, batch_size={cfg.batch_size}, {self.world_size} processes",
        )
        saved_steps = checkpoint.get(STEPS_PER_EPOCH_KEY)
        if self._resume_from_checkpoint and saved_steps is not None and saved_steps != self._steps_per_epoch:
            raise ValueError(
                f"resume_from_checkpoint: the run had {saved_steps} steps per epoch, this config gives "
                f"{self._steps_per_epoch} ({self.world_size} processes, batch_size={cfg.batch_size}, "
                f"gradient_accumulation_steps={self._gradient_accumulation_steps}); resume with the original layout"
            )
        self.global_step = self.epochs_run * self._steps_per_epoch
        self._optimizer, self._lr_scheduler = setup_optimizer(
            cfg,
            model,
            checkpoint=checkpoint,
            resume=self._resume_from_checkpoint,
            device=self._device,
            total_steps=self.total_epochs * self._steps_per_epoch,
            steps_done=self.global_step,
        )

    def micro_batches(self, epoch: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """This epoch's micro-batches on the device, ``(index, batch)``, up to ``steps_per_epoch`` optimizer steps;
        each epoch has its own reproducible shuffle."""
        self._sampler.set_epoch(epoch)
        for micro_step, batch in enumerate(self._dataloader):
            if micro_step // self._gradient_accumulation_steps >= self._steps_per_epoch:
                return
            yield micro_step, {key: value.to(self._device) for key, value in batch.items()}

    def closes_step(self, micro_step: int) -> bool:
        """Whether this micro-batch is the last one accumulated into an optimizer step."""
        return (micro_step + 1) % self._gradient_accumulation_steps == 0

    def progress_bar(self, epoch: int) -> tqdm:
        return tqdm(total=self._steps_per_epoch, disable=not self._is_rank_zero, desc=f"epoch {epoch + 1}")

    def optimizer_step(self, model: nn.Module, loss: float, epoch: int) -> float | None:
        """Clip, refuse a non-finite update, step optimizer and schedule; returns the gradient norm."""
        grad_norm = guarded_optimizer_step(
            model,
            self._optimizer,
            self._lr_scheduler,
            loss=loss,
            clip_grad_norm=self._clip_grad_norm,
            where=f"step {self.global_step + 1} (epoch {epoch + 1})",
        )
        self.global_step += 1
        return grad_norm

    def log_step(self, metrics: dict[str, float], *, tokens: float, elapsed: float, grad_norm: float | None) -> None:
        """Log the recipe's own metrics with lr, throughput, step time, peak memory and gradient norm (rank 0,
        every ``log_every_n_steps``)."""
        if not self._is_rank_zero or self.global_step % self._log_every_n_steps != 0:
            return
        metrics = {
            **metrics,
            "lr": training.get_lr(self._optimizer),
            "tokens_per_second": tokens / elapsed,
            "step_time": elapsed,
            **memory_stats(self._device),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self._metric_logger.log_dict(metrics, step=self.global_step)

    def finish_step(
        self, model: nn.Module, *, loss: float, metrics: dict[str, float], tokens: float, epoch: int, progress: tqdm,
        started: float,
    ) -> None:
        """The end of an optimizer step: guarded update, metrics (with the step's wall time since ``started``),
        progress bar."""
        grad_norm = self.optimizer_step(model, loss, epoch)
        self.log_step(metrics, tokens=tokens, elapsed=time.perf_counter() - started, grad_norm=grad_norm)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4g}")

    def save_checkpoint(self, model: nn.Module, epoch: int) -> None:
        """The HF checkpoint of ``epoch`` (and, before the last epoch, what resuming needs). Collective."""
        self.epochs_run = epoch + 1
        save_epoch_checkpoint(
            self._checkpointer,
            model,
            self._optimizer,
            epoch=epoch,
            total_epochs=self.total_epochs,
            recipe_state=recipe_state(
                seed=self.seed,
                epochs_run=self.epochs_run,
                total_epochs=self.total_epochs,
                max_steps_per_epoch=self.max_steps_per_epoch,
                steps_per_epoch=self._steps_per_epoch,
            ),
            device=self._device,
            is_rank_zero=self._is_rank_zero,
        )

    def cleanup(self) -> None:
        if self._is_rank_zero and hasattr(self, "_metric_logger"):
            self._metric_logger.close()
        dist.destroy_process_group()


def run_recipe(recipe_cls: type, cfg: DictConfig) -> None:
    """Construct, set up, train, and always leave the process group."""
    recipe = recipe_cls(cfg=cfg)
    config.log_config(recipe_name=recipe_cls.__name__, cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.train()
    finally:
        recipe.cleanup()
