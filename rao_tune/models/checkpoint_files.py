"""The weight files of an HF checkpoint folder, found the way ``transformers`` finds them, so that a recipe reading
a checkpoint needs only its folder: an index (what our recipes' ``epoch_N`` folders and sharded hub checkpoints
have) names the shards, else the folder holds one ``model.safetensors`` or ``pytorch_model.bin``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from omegaconf import DictConfig, OmegaConf

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def find_checkpoint_files(checkpoint_dir: Union[str, os.PathLike]) -> list[str]:
    """The weight file names of an HF checkpoint folder: the shards its index names, else its single file."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    for name in INDEX_FILES:
        if (folder / name).exists():
            return sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    for name in SINGLE_FILES:
        if (folder / name).exists():
            return [name]
    others = sorted(path.name for path in folder.iterdir() if path.suffix in _WEIGHT_SUFFIXES)
    raise FileNotFoundError(
        f"{folder}: no HF weights found: looked for {', '.join(INDEX_FILES + SINGLE_FILES)}"
        + (f" (the folder has {', '.join(others)}: name them in checkpointer.checkpoint_files)" if others else "")
    )


def with_checkpoint_files(cfg_checkpointer: DictConfig) -> DictConfig:
    """The checkpointer config as given when it names its ``checkpoint_files``; when it names none (absent or
    null), with those :func:`find_checkpoint_files` finds in its ``checkpoint_dir``."""
    if cfg_checkpointer.get("checkpoint_files") is not None:
        return cfg_checkpointer
    return OmegaConf.merge(cfg_checkpointer,
                           {"checkpoint_files": find_checkpoint_files(cfg_checkpointer.checkpoint_dir)})
