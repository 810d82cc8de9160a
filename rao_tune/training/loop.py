"""The pieces of a training loop that the recipes share: resumable data loading, optimizer and schedule set-up,
one guarded optimizer step, and held-out evaluation over evenly sharded batches."""

from __future__ import annotations

import gc
import itertools
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchtune import config

from rao_tune.training.distributed import all_reduce_sum
from rao_tune.training.optim_in_backward import OptimizerInBackward


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next pass can start after its first ``n`` batches, so a run resumed in the
    middle of an epoch sees exactly the batches the uninterrupted run would have seen next."""

    def __init__(self, dataset: Dataset, *, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.batch_size, self._skip = batch_size, 0

    def skip_batches(self, num_batches: int) -> None:
        """Leave out the first ``num_batches`` batches of the next pass only."""
        self._skip = num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(super().__iter__(), skip, None)


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    world_size: int,
    rank: int,
    shuffle: bool,
    seed: int,
    collate_fn: Callable[[list], dict],
) -> tuple[ResumableSampler, DataLoader]:
    """Each rank gets ``batch_size`` examples (prompts with all their responses, for preference data) per
    micro-batch; the last partial batch is dropped so every rank and micro-batch holds the same number of them
    and means of means stay exact."""
    sampler = ResumableSampler(
        dataset, batch_size=batch_size, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    # Its own generator: iterating must not draw from the global RNG, which a resumed run restores exactly.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(seed))
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
    cfg: DictConfig, model: nn.Module, *, total_steps: int, param_groups: Optional[list[dict[str, Any]]] = None
) -> tuple[torch.optim.Optimizer, Any]:
    """Optimizer and LR schedule from ``cfg.optimizer`` / ``cfg.lr_scheduler``, at step 0 (a resumed run loads
    both states from its step checkpoint), over ``param_groups`` (default: one group, the trainable parameters).
    ``optimizer_in_bwd=True``: the configured optimizer per parameter, stepped inside backward
    (:class:`~rao_tune.training.optim_in_backward.OptimizerInBackward`)."""
    params = param_groups or [param for param in model.parameters() if param.requires_grad]
    if cfg.get("optimizer_in_bwd", False):
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        optimizer = OptimizerInBackward(groups, lambda group: config.instantiate(cfg.optimizer, group))
    else:
        optimizer = config.instantiate(cfg.optimizer, params)
    lr_scheduler = config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
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
    the last saved checkpoint stays the last good one. ``loss`` must already be reduced over ranks so that
    every rank takes the same decision. Each parameter group is clipped on its own (a policy and its value model
    do not share one norm). Returns the first group's gradient norm (before clipping) when clipping."""
    norms = []
    if clip_grad_norm is not None:
        for group in optimizer.param_groups:
            norm = torch.nn.utils.clip_grad_norm_(group["params"], float(clip_grad_norm))
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    grad_norm = norms[0] if norms else None
    bad_norm = next((norm for norm in norms if not math.isfinite(norm)), None)
    if not math.isfinite(loss) or bad_norm is not None:
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {bad_norm}"
        applied = ("the weights in memory took this step's update in backward (optimizer_in_bwd), but no checkpoint "
                   "holds it" if isinstance(optimizer, OptimizerInBackward) else "no update was applied")
        raise FloatingPointError(
            f"Stopping: the {what} at {where}; {applied}. The last good checkpoint is the latest "
            "checkpoints/step_* folder in the output_dir (resume_from_checkpoint=True). Lower the learning rate, "
            "check the scale of the rewards against the loss's hyperparameters, or use dtype=fp32."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()
    return grad_norm


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


def held_out_sums(
    model: nn.Module,
    dataset: Sequence[dict],
    score: Callable[[dict[str, torch.Tensor], int], dict[str, float]],
    *,
    collate_fn: Callable[[list], dict[str, torch.Tensor]],
    batch_size: int,
    device: torch.device,
    world_size: int,
    rank: int,
) -> dict[str, float]:
    """Sums of ``score(batch, num_examples)`` over ``dataset``, each example scored by exactly one process, summed
    over processes (collective). Runs ``model`` in eval mode without gradients, then back to training mode."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for samples, real in sharded_eval_batches(dataset, batch_size=batch_size, world_size=world_size, rank=rank):
            batch = {key: value.to(device) for key, value in collate_fn(samples).items()}
            scored = score(batch, len(samples))  # every rank runs the forward: FSDP's gathers are collective
            kept = 1.0 if all(real) else 0.0  # a rank out of examples scores a stand-in and adds zeros
            sums = {key: sums.get(key, 0.0) + kept * value for key, value in scored.items()}
    model.train()
    return all_reduce_sum(sums, device)


def free_memory() -> None:
    """Return what dropped models held: Python's cycles, then the CUDA allocator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
