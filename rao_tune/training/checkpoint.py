"""Saving and resuming a sharded run through torchtune's checkpointers (HF format in and out)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, training
from torchtune.training.checkpointing._utils import RECIPE_STATE_DIRNAME

log = logging.getLogger(__name__)


def save_epoch_checkpoint(
    checkpointer: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    total_epochs: int,
    recipe_state: dict[str, Any],
    device: torch.device,
    is_rank_zero: bool,
) -> None:
    """Write the model as an HF checkpoint in ``output_dir/epoch_{epoch}``; before the last epoch also the
    optimizer and ``recipe_state`` (seed, epochs run, ...) so ``resume_from_checkpoint=True`` can continue.

    Every rank must call this: gathering the sharded weights and optimizer state is collective.
    """
    start = time.perf_counter()
    intermediate = epoch + 1 < total_epochs
    model_state = training.gather_cpu_state_dict(model, is_rank_zero, device=device)
    optimizer_state = (
        training.get_full_optimizer_state_dict(model, optimizer, is_rank_zero, device=device) if intermediate else None
    )
    if is_rank_zero:
        state: dict[str, Any] = {training.MODEL_KEY: model_state}
        if intermediate:
            state.update({training.OPT_KEY: optimizer_state, **recipe_state})
        checkpointer.save_checkpoint(state, epoch=epoch, intermediate_checkpoint=intermediate)
        log.info("Saved epoch %d checkpoint in %.1f s", epoch, time.perf_counter() - start)
    dist.barrier()


def check_resume_state(checkpoint: dict[str, Any], *, seed: int, total_epochs: int, max_steps_per_epoch: Any) -> int:
    """Validate a loaded recipe state against the config; return how many epochs were already run.

    A resumed run only reproduces the uninterrupted one with the same seed and step budget, so a mismatch
    is an error rather than a silent divergence.
    """
    for key, expected in (
        (training.SEED_KEY, seed),
        (training.TOTAL_EPOCHS_KEY, total_epochs),
        (training.MAX_STEPS_KEY, max_steps_per_epoch),
    ):
        if key in checkpoint and checkpoint[key] != expected:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint was written with {key}={checkpoint[key]!r} but the config "
                f"says {expected!r}; use the original value to resume this run"
            )
    if training.EPOCHS_KEY not in checkpoint:
        raise ValueError("resume_from_checkpoint=True but the checkpoint has no recipe state (recipe_state.pt)")
    return int(checkpoint[training.EPOCHS_KEY])


def instantiate_checkpointer(cfg_checkpointer: DictConfig, *, resume: bool) -> Any:
    """The configured checkpointer; with ``resume`` it reads the epoch that the saved recipe state belongs to.

    torchtune 0.6.1 resumes from ``output_dir/<checkpoint_files>``, so a user would have to rewrite
    ``checkpoint_files`` by hand. Here ``resume_from_checkpoint=True`` alone suffices: the recipe state
    says how many epochs ran (N), and the model is read from ``output_dir/epoch_{N-1}``, never from a
    later, possibly half-written folder.
    """
    if not resume:
        return config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
    output_dir = Path(cfg_checkpointer.output_dir)
    state_path = output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
    if not state_path.exists():
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {state_path} does not exist: no epoch of this run finished "
            "before the last one (the final epoch saves no recipe state), so there is nothing to resume"
        )
    # mmap: only the epoch count is read here, not the (large) optimizer state.
    epochs_run = torch.load(state_path, mmap=True, weights_only=True, map_location="cpu")[training.EPOCHS_KEY]
    epoch_dir = output_dir / f"epoch_{epochs_run - 1}"
    index_path = next(epoch_dir.glob("*.index.json"), None)
    if index_path is not None:
        files = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in epoch_dir.glob("*.safetensors")) or sorted(p.name for p in epoch_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"resume_from_checkpoint=True but {epoch_dir} holds no model files")
    log.info("Resuming after epoch %d from %s", epochs_run, epoch_dir)
    # Replace, not merge: the configured files may be torchtune's {filename_format, max_filename} mapping.
    resumed = cfg_checkpointer.copy()
    OmegaConf.update(resumed, "checkpoint_files", [f"{epoch_dir.name}/{name}" for name in files], merge=False)
    return config.instantiate(resumed, should_load_recipe_state=True, recipe_checkpoint=None)
