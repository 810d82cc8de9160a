"""A recipe's refusal reaches the user as one line, not a traceback.

Every check of rao_tune (config, data, checkpoint, resume, cache, run folder) raises ``ValueError`` or
``FileNotFoundError`` with a message that says what is wrong and what to do; the NaN guard raises
``FloatingPointError``. :func:`run_main` (each recipe file's ``__main__``) prints that message as the last line of
the process's output, once, and exits with 2; ``RAO_TUNE_DEBUG=1`` shows the traceback as well. Under ``torchrun``
the message also goes to the worker's error file, so torchrun's failure summary names it as the root cause instead
of "<N/A>". Our checks raise from rao_tune or a recipe file; a ValueError raised anywhere else (torch, torchtune,
a library bug) keeps the one line but names where it was raised, so a bug is not mistaken for a refusal. A
preemption stop (:class:`~rao_tune.training.cluster.Preempted`) exits with
:data:`~rao_tune.training.cluster.PREEMPTED_EXIT_CODE`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from rao_tune.training.cluster import PREEMPTED_EXIT_CODE, Preempted


class CheckpointWriteError(OSError):
    """A step checkpoint could not be written (disk full, quota, permissions); the message names the cause and
    the newest complete checkpoint, which is intact."""


USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, CheckpointWriteError)
REFUSED_EXIT_CODE = 2
DEBUG_VARIABLE = "RAO_TUNE_DEBUG"
# Where our own checks live: the package and the recipe files beside it.
OUR_CODE = (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2] / "recipes")


def run_main(main: Callable[[], object]) -> int:
    """``main()`` with refusals as one line: the exit code for ``sys.exit``."""
    try:
        main()
        return 0
    except SystemExit as done:  # torchtune's config.parse exits itself
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except Preempted as stop:
        last_line, code = f"rao_tune: {stop}", PREEMPTED_EXIT_CODE
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            traceback.print_exc()
        message = f"{type(err).__name__}: {err}" if isinstance(err, FloatingPointError) else str(err)
        message += raised_outside_our_code(err)
        _record_for_torchrun(message)
        last_line, code = f"rao_tune error: {message}", REFUSED_EXIT_CODE
    # Out of the except block the failed run's frames are released: what they still hold (a progress bar) prints
    # its last state now, not after our line.
    gc.collect()
    sys.stderr.flush()
    print(last_line, file=sys.stderr, flush=True)
    return code


def raised_outside_our_code(err: BaseException) -> str:
    """Empty when ``err`` was raised by rao_tune or a recipe file (a refusal); else where it was raised."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    origin = frames[-1]
    path = Path(origin.filename).resolve()
    if any(path.is_relative_to(root) for root in OUR_CODE):
        return ""
    return (f" ({type(err).__name__} raised in {origin.filename}:{origin.lineno}, {origin.name}; "
            f"{DEBUG_VARIABLE}=1 shows the traceback)")


def _record_for_torchrun(message: str) -> None:
    """Write the message where torchrun's failure summary reads a worker's error (its own format)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass
