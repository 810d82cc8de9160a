"""What a cluster does to a job, handled: a preemption signal before the kill, and a second job on the same run folder.

- :class:`PreemptionWatch`: the signals named by ``save_on_signal`` (default SIGTERM and SIGUSR1: Slurm's and
  Kubernetes' warnings before a kill) only set a flag; at the end of the optimizer step in progress every process
  learns whether any of them was signalled (one tiny all-reduce), a step checkpoint is written through the usual
  atomic path, ``output_dir/preempted.json`` says which signal and step, and the process exits with
  :data:`PREEMPTED_EXIT_CODE`. ``torchrun`` forwards SIGTERM to its workers and gives them 30 s before SIGKILL, but
  exits with 1 itself: a requeue script reads ``preempted.json`` (``scripts/slurm_multinode.sh`` does).
- :class:`RunLock`: an advisory ``fcntl.flock`` on ``output_dir/.run.lock``, held by the launch's rank 0 for the
  run's life. The kernel drops it when the holder dies, so a stale lock file never blocks; the file names the
  holder (host, pid, start time) for the message a second job gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Optional, Sequence

import torch

from rao_tune.training.distributed import max_over_ranks

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; what a worker exits with after a preemption save
PREEMPTED_FILE = "preempted.json"
LOCK_FILE = ".run.lock"
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """Raised at a step's end after the step checkpoint was saved because of ``signal_name``."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}: saved {checkpoint}; resume with "
                         "resume_from_checkpoint=auto (or True)")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


def signal_numbers(names: Optional[Sequence[str]]) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", ...]`` as signals; null or an empty list: none. An unknown name is refused."""
    numbers = []
    for name in names or ():
        full = str(name).upper() if str(name).upper().startswith("SIG") else f"SIG{str(name).upper()}"
        if not hasattr(signal.Signals, full) or full in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"config: save_on_signal names '{name}', not a signal a process can catch "
                             "(e.g. SIGTERM, SIGUSR1); null turns saving on a signal off")
        numbers.append(signal.Signals[full])
    return numbers


class PreemptionWatch:
    """Remembers the first of ``signals`` this process receives (handlers installed here, the previous ones
    restored by :meth:`close`). Must be created in the main thread."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.received: Optional[signal.Signals] = None
        self._previous = {number: signal.signal(number, self._handle) for number in signals}

    def _handle(self, number: int, frame: Optional[FrameType]) -> None:
        if self.received is not None:  # a second signal: the user insists, stop now as the signal would
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.received = signal.Signals(number)
        log.warning("received %s: finishing this step, then saving a step checkpoint and stopping (a second "
                    "signal stops at once)", self.received.name)

    def requested(self, device: torch.device) -> Optional[str]:
        """The signal's name if any process received one (collective when there are several processes)."""
        if not self._previous:
            return None
        code = max_over_ranks(float(self.received or 0), device)
        return signal.Signals(int(code)).name if code else None

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


def write_preempted(output_dir: Path, signal_name: str, step: int, checkpoint: Path) -> None:
    """The note a requeue script reads (a fresh start or resume removes it: :func:`clear_preempted`)."""
    note = {"signal": signal_name, "step": step, "checkpoint": str(checkpoint), "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(output_dir) / PREEMPTED_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(note) + "\n")
    os.replace(tmp, path)


def clear_preempted(output_dir: Path) -> None:
    (Path(output_dir) / PREEMPTED_FILE).unlink(missing_ok=True)


class RunLocked(ValueError):
    """Another live job holds the run folder."""


class RunLock:
    """``with RunLock(output_dir):`` one job per run folder; raises :class:`RunLocked` naming the holder."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if not isinstance(err, BlockingIOError):  # a file system without flock (some Lustre mounts)
                log.warning("cannot lock %s (%s): a second job on this output_dir would not be stopped", self.path, err)
                handle.close()
                return self
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise RunLocked(
                f"output_dir {self.path.parent} is in use by another job ({holder}); wait for it to end, stop it, "
                "or choose another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
