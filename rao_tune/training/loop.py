"""The pieces of a training loop that the RAO and reward-model recipes share: data loading, optimizer and
schedule set-up (with resume), one guarded optimizer step, and evenly sharded evaluation batches."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchtune import config, training



def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    shuffle: bool,
    seed: int,
    collate_fn: Callable[[list], dict],
) -> tuple[DistributedSampler, DataLoader]:
    """Each rank gets ``batch_size`` examples (prompts with all their responses, for preference data) per
    micro-batch; the last partial batch is dropped so every rank and micro-batch holds the same number of them
    and means of means stay exact."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
    )
    return sampler, loader


def steps_per_epoch(
    num_batches: int, *, gradient_accumulation_steps: int, max_steps_per_epoch: Optional[int], explain: str
) -> int:
    steps = num_batches // gradient_accumulation_steps
    if max_steps_per_epoch is not None:
        steps = min(steps, max_steps_per_epoch)
    if steps == 0:
        raise ValueError(f"an epoch has no optimizer step: {explain}, gradient_accumulation_steps={gradient_accumulation_steps}")
    return steps


def setup_optimizer(
    cfg: DictConfig,
    model: nn.Module,
    *,
    checkpoint: dict[str, Any],
    resume: bool,
    device: torch.device,
    total_steps: int,
    steps_done: int,
) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and LR schedule from ``cfg.optimizer`` / ``cfg.lr_scheduler``; on resume the optimizer state is
    loaded into the shards and the schedule continues from ``steps_done``."""
    optimizer = config.instantiate(cfg.optimizer, model.parameters())
    if resume:
        training.load_from_full_optimizer_state_dict(model, optimizer, checkpoint[training.OPT_KEY], device)
    lr_scheduler = config.instantiate(
        cfg.lr_scheduler, optimizer, num_training_steps=total_steps, last_epoch=steps_done - 1
    )
    return optimizer, lr_scheduler


def guarded_optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    *,
    loss: float,
    clip_grad_norm: Optional[float],
    where: str,
) -> Optional[float]:
    """Clip, check, step. A non-finite loss or gradient norm raises before the update reaches the weights, so
    the last saved epoch stays the last good checkpoint. ``loss`` must already be reduced over ranks so that
    every rank takes the same decision. Returns the gradient norm (before clipping) when clipping."""
    grad_norm = None
    if clip_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip_grad_norm))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        grad_norm = float(grad_norm)
    if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
        raise FloatingPointError(
            f"Stopping: the {what} at {where}; no update was applied. The last good checkpoint is the latest "
            "epoch_* folder in the output_dir (if any epoch finished). Lower the learning rate, check the scale "
            "of the rewards against the loss's hyperparameters, or use dtype=fp32."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return grad_norm


STEPS_PER_EPOCH_KEY = "steps_per_epoch"


def recipe_state(
    *, seed: int, epochs_run: int, total_epochs: int, max_steps_per_epoch: Optional[int], steps_per_epoch: int
) -> dict:
    """What a resumed run checks and continues from (see ``check_resume_state``). ``steps_per_epoch`` pins the
    step layout (processes x batch size x accumulation): another layout would shift the LR schedule."""
    return {
        training.SEED_KEY: seed,
        training.EPOCHS_KEY: epochs_run,
        training.TOTAL_EPOCHS_KEY: total_epochs,
        training.MAX_STEPS_KEY: max_steps_per_epoch,
        STEPS_PER_EPOCH_KEY: steps_per_epoch,
    }


def sharded_indices(num_examples: int, *, batch_size: int, world_size: int, rank: int) -> Iterator[list[int]]:
    """This rank's share of ``range(num_examples)`` in batches: every index exactly once over all ranks, in the
    same number of batches on every rank (FSDP's forward is collective). A rank that has run out gets empty
    batches, on which it still runs a forward pass (on any example) and keeps nothing."""
    own = list(range(rank, num_examples, world_size))
    num_batches = math.ceil(math.ceil(num_examples / world_size) / batch_size)
    for batch_index in range(num_batches):
        yield own[batch_index * batch_size : (batch_index + 1) * batch_size]


def sharded_eval_batches(
    dataset: Sequence[dict], *, batch_size: int, world_size: int, rank: int
) -> Iterator[tuple[list[dict], list[bool]]]:
    """:func:`sharded_indices` as examples: a rank that runs out of examples gets a one-example batch flagged
    False, to be left out of metrics."""
    for indices in sharded_indices(len(dataset), batch_size=batch_size, world_size=world_size, rank=rank):
        if indices:
            yield [dataset[i] for i in indices], [True] * len(indices)
        else:
            yield [dataset[0]], [False]
