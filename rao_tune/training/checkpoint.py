"""Step checkpoints that survive a kill at any moment, and HF-format exports.

What a resumed run needs lives in ``output_dir/checkpoints/step_{N}/``: a sharded ``torch.distributed.checkpoint``
(DCP) of model and optimizer (each process writes its own shards, in parallel), ``trainer_state.pt`` (LR schedule,
position in the data, the run's settings) and each process's RNG states. A checkpoint is written into
``step_{N}.partial/`` and renamed once every file is on disk (fsync'd), so a folder without ``.partial`` is
complete; a kill leaves at most a ``.partial`` folder, which resume ignores and the next save deletes. The last
``keep_last_n`` complete checkpoints are kept (an older one is renamed ``.deleting`` before it is removed, so a
kill during the removal never leaves a half-deleted folder under a complete checkpoint's name).

Weights for users (transformers, vllm, the pipeline's next stage) are exported in HF format to
``output_dir/epoch_N/`` at each epoch end, through a staging folder and a rename as well;
``recipes/export_checkpoint.py`` exports any step checkpoint the same way.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torchtune import training, utils

from rao_tune.files import fsync_tree, replace_dir, torch_save_atomically
from rao_tune.training.distributed import max_over_ranks
from rao_tune.training.errors import CheckpointWriteError
from rao_tune.training.lora import ADAPTER_DIR, AdapterExport
from rao_tune.training.optim_in_backward import checkpointed_optimizers

log = utils.get_logger("INFO")

CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"  # torchtune's checkpointer writes exports here before they are renamed into place
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter|inline_container|file write failed")
# Settings a resumed run must share with the run it continues (else its data order or schedule would shift).
WRITER_THREADS = 4  # files each process writes at once (measured: 4 threads save 10-30% faster than 1)
RUN_SETTINGS = ("seed", "total_epochs", "max_steps_per_epoch", "steps_per_epoch", "world_size", "batch_size",
                "gradient_accumulation_steps", "optimizer_in_bwd")
# What a checkpoint written before a setting existed was written with.
SETTING_DEFAULTS = {"optimizer_in_bwd": False}
# Only what trains is saved: a LoRA run's frozen base (NF4 in QLoRA) comes back from the starting checkpoint.
_TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)


@dataclass
class Progress:
    """Where training stands: the epoch in progress (``total_epochs`` once finished), the optimizer steps done
    in it, and in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete step checkpoints of a run, oldest first (``.partial`` folders are not complete)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [(int(match.group(1)), path) for path in root.glob("step_*") if (match := _STEP_DIR.match(path.name))]
    return [path for _, path in sorted(found)]


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / TRAINER_STATE, weights_only=True)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StepCheckpointer:
    """Saves and restores step checkpoints of one run (collective calls: every process makes them).

    Args:
        output_dir: the run's folder; checkpoints go to ``output_dir/checkpoints``.
        keep_last_n: complete checkpoints kept (None: all).
        async_save: write the DCP shards in the background (``dcp.async_save``) while training goes on; the
            checkpoint is committed (renamed) when the next save starts or the run ends.
    """

    def __init__(self, output_dir: Path, *, keep_last_n: Optional[int], async_save: bool, rank: int) -> None:
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.keep_last_n, self.async_save, self.rank = keep_last_n, async_save, rank
        self._pending: Optional[tuple[Any, Path, Path, float]] = None
        self._swept = False
        # The background save's collectives get a group of their own, so they never interleave with training's.
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, progress: Progress,
        run_settings: dict[str, Any],
    ) -> Path:
        """Write ``checkpoints/step_{global_step}`` (committed now, or by :meth:`finish` when asynchronous); its path.
        A failed write raises :class:`CheckpointWriteError` with the cause in one line."""
        self.finish()  # one checkpoint at a time: the previous one is committed first
        final = self.root / f"step_{progress.global_step:08d}"
        thread_errors: list[BaseException] = []
        try:
            with _writer_thread_errors(thread_errors):
                return self._save(model, optimizer, lr_scheduler, progress, run_settings, final, thread_errors)
        except (Exception, CheckpointException) as err:  # (DCP's is a BaseException)
            self._raise_write_error(final, err, thread_errors)
            raise

    def _raise_write_error(self, final: Path, err: BaseException, thread_errors: list[BaseException] = ()) -> None:
        """A failed write (an OSError, or torch.save's zip writer failing, possibly inside DCP's per-rank report or
        a writer thread) as one line; anything else is a bug and is left to propagate as it is."""
        if _write_failure(err) is None:
            return
        causes = [_write_failure(error) for error in (err, *thread_errors)]
        cause = next((c for c in causes if isinstance(c, OSError)), causes[0])
        newest = complete_checkpoints(self.root.parent)
        free = shutil.disk_usage(self.root).free / 2**20 if self.root.exists() else float("nan")
        raise CheckpointWriteError(
            f"the step checkpoint {final.name} could not be written in {self.root} ({type(cause).__name__}: "
            f"{str(cause).strip()}; {free:.0f} MiB free there); the newest complete checkpoint is "
            f"{newest[-1].name if newest else 'none yet'}, intact; free space and resume with resume_from_checkpoint=auto"
        ) from err

    def _save(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, progress: Progress,
              run_settings: dict[str, Any], final: Path, thread_errors: list[BaseException]) -> Path:
        started = time.perf_counter()
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if not self._swept:  # what a killed run left: unfinished saves and removals
                for stale in [*self.root.glob("*.partial"), *self.root.glob("*.deleting"), *self.root.glob("*.old")]:
                    shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self._swept = True
        _barrier()
        model_state, optimizer_state = get_state_dict(model, checkpointed_optimizers(optimizer), options=_TRAINED_ONLY)
        torch_save_atomically(_rng_state(), partial / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            trainer_state = {"lr_scheduler": lr_scheduler.state_dict(), "progress": asdict(progress), **run_settings}
            torch_save_atomically(trainer_state, partial / TRAINER_STATE)
        state = {"model": model_state, "optimizer": optimizer_state}
        writer = dcp.FileSystemWriter(str(partial), thread_count=WRITER_THREADS)  # fsyncs each file it writes
        if self.async_save:
            future = dcp.async_save(state, storage_writer=writer, process_group=self._async_group)
            self._pending = (future, partial, final, started)
            return final
        dcp.save(state, storage_writer=writer)
        # torch 2.13's extra writer threads can die without the save noticing: a shard would be missing from a
        # folder about to be called complete. Every rank learns whether any rank lost one, before the rename.
        if max_over_ranks(float(bool(thread_errors))):  # any rank lost a shard
            raise thread_errors[0] if thread_errors else OSError(f"another process could not write its part of {partial}")
        self._commit(partial, final, started)
        return final

    def finish(self, *, failed: bool = False) -> None:
        """Commit an asynchronous save still in flight (collective; a no-op otherwise). After a failure another
        process may never arrive: only wait for this process's writes and leave the save ``.partial``."""
        if self._pending is not None:
            future, partial, final, started = self._pending
            self._pending = None
            try:
                future.result()
            except (Exception, CheckpointException) as err:
                if failed:
                    return
                self._raise_write_error(final, err)
                raise
            if not failed:
                self._commit(partial, final, started)

    def _commit(self, partial: Path, final: Path, started: float) -> None:
        _barrier()  # every process's files are written
        if self.rank == 0:
            fsync_tree(partial)
            replace_dir(partial, final)
            for stale in complete_checkpoints(self.root.parent)[: -self.keep_last_n] if self.keep_last_n else []:
                deleting = stale.with_name(stale.name + ".deleting")
                os.replace(stale, deleting)
                shutil.rmtree(deleting, ignore_errors=True)
            size = sum(f.stat().st_size for f in final.iterdir())
            log.info("Saved step checkpoint %s (%.1f MiB) in %.2f s", final, size / 2**20, time.perf_counter() - started)
        _barrier()

    def load(
        self, checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any
    ) -> tuple[Progress, dict[str, Any]]:
        """Restore model, optimizer, schedule and this process's RNG from ``checkpoint``; return the progress and
        the run settings it was written with."""
        optimizers = checkpointed_optimizers(optimizer)
        model_state, optimizer_state = get_state_dict(model, optimizers, options=_TRAINED_ONLY)  # (creates their state)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        trainer_state = read_trainer_state(checkpoint)
        lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        # The schedule's lr, also where DCP restores none (an OptimizerInBackward's own groups).
        for group, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
            group["lr"] = lr
        rng_path = Path(checkpoint) / f"rng_rank{self.rank}.pt"
        if rng_path.exists():
            _set_rng_state(torch.load(rng_path, weights_only=False))  # our own file: numpy's state is not a tensor
        else:  # written by fewer processes (an elastic resume): training draws nothing; sampling (PPO) differs
            log.warning("%s holds no RNG state for rank %d: this process keeps its seeded generators", checkpoint,
                        self.rank)
        return Progress(**trainer_state["progress"]), trainer_state


def _write_failure(err: BaseException) -> Optional[BaseException]:
    """The failed write behind ``err`` (DCP's per-rank report unwrapped): the OSError itself where the chain holds
    one (torch.save re-raises a failed write as a RuntimeError of its zip writer), or that RuntimeError; None when
    ``err`` is not a write failure."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    link: Optional[BaseException] = err
    while link is not None:
        if isinstance(link, OSError):
            return link
        link = link.__context__
    return err if _TORCH_WRITE_FAILED.search(str(err)) else None


@contextmanager
def _writer_thread_errors(errors: list[BaseException]) -> Iterator[None]:
    """DCP's writer threads let a failed write escape, and Python would print each one's traceback: collect them
    into ``errors`` instead; the save reports the failure once (:meth:`StepCheckpointer._raise_write_error`)."""
    previous = threading.excepthook

    def record(args: Any) -> None:
        if _write_failure(args.exc_value) is None:  # not a failed write: someone else's thread, report as usual
            previous(args)
        else:
            errors.append(args.exc_value)

    threading.excepthook = record
    try:
        yield
    finally:
        threading.excepthook = previous


def export_hf_checkpoint(
    checkpointer: Any, model: nn.Module, *, name: str, staging_epoch: int, output_dir: Path, device: torch.device,
    is_rank_zero: bool, adapters: Optional[AdapterExport] = None,
) -> None:
    """Write the model as an HF checkpoint to ``output_dir/name`` (collective: the weights are gathered).
    A LoRA model (``adapters``) is written merged, with its adapters in PEFT format in ``name/adapter``."""
    model_state = training.gather_cpu_state_dict(model, is_rank_zero, device=device)
    if is_rank_zero:
        write_hf_export(checkpointer, model_state, staging_dir=Path(output_dir) / STAGING_DIR, staging_epoch=staging_epoch,
                        export_dir=Path(output_dir) / name, adapters=adapters)
    _barrier()


def write_hf_export(
    checkpointer: Any, model_state: dict[str, Any], *, staging_dir: Path, staging_epoch: int, export_dir: Path,
    adapters: Optional[AdapterExport] = None,
) -> None:
    """Write a whole state dict as an HF checkpoint (merged, plus a PEFT adapter, for a LoRA model) to ``export_dir``.

    ``checkpointer`` (torchtune's HF checkpointer or ours) must have been built with its output directory at
    ``staging_dir``: it writes ``epoch_{staging_epoch}`` there, which is synced and renamed into place.
    """
    started = time.perf_counter()
    staged = Path(staging_dir) / f"epoch_{staging_epoch}"
    if adapters is not None:
        model_state = adapters.split(model_state, staged / ADAPTER_DIR)
    checkpointer.save_checkpoint({training.MODEL_KEY: model_state}, epoch=staging_epoch, intermediate_checkpoint=False)
    fsync_tree(staged)
    replace_dir(staged, Path(export_dir))
    log.info("Exported %s in HF format in %.1f s", export_dir, time.perf_counter() - started)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
