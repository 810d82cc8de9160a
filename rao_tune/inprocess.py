"""Run one of our recipe files inside this Python process, as ``tune run --nproc_per_node 1`` would.

The toy pipeline, the study and the tests run many short stages; starting a process for each costs ~10 s
of imports. The recipe code is exactly the one ``tune run`` runs: only the launcher is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from rao_tune.training.distributed import one_process_env

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name: str) -> ModuleType:
    """A fresh module object for ``recipes/<name>.py`` (torchtune installs its own top-level ``recipes``
    package, so ours is loaded by path)."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", REPO_ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_recipe_main(recipe: ModuleType, config_path: Path, *overrides: str) -> None:
    """``recipe.recipe_main()`` with ``--config config_path overrides`` as its command line; a non-zero exit
    raises. The caller provides the process-group environment (:func:`one_process_env`)."""
    argv, excepthook = sys.argv, sys.excepthook
    sys.argv = [recipe.__name__, "--config", str(config_path), *overrides]
    try:
        recipe.recipe_main()
    except SystemExit as done:  # torchtune's config.parse ends with sys.exit(recipe_main(...))
        if done.code not in (None, 0):
            raise RuntimeError(f"{recipe.__name__} with {config_path} exited with {done.code}") from None
    finally:
        # init_process_group wraps sys.excepthook with a "[rank0]: " prefix each time: undo it, or a traceback
        # after many in-process runs carries the prefix once per run.
        sys.argv, sys.excepthook = argv, excepthook


def run_recipe(name: str, config: str | Path, *overrides: str) -> None:
    """``tune run --nproc_per_node 1 recipes/<name>.py --config configs/<config>.yaml <overrides>``, in this
    process; ``config`` is a shipped config's name or the path of a YAML file."""
    os.environ.update(one_process_env())
    path = config if isinstance(config, Path) else REPO_ROOT / "configs" / f"{config}.yaml"
    call_recipe_main(load_recipe(name), path, *overrides)
