"""Mistakes caught before a model loads: what costs a user a GPU allocation should cost them seconds instead.

Every check raises ``ValueError`` with one line that says what is wrong, where, and what to do:

- :func:`check_config`: top-level keys the recipe does not read (with the closest one it does), counts that must
  be >= 1, a device that does not exist;
- :func:`check_output_dir`: a run folder that already holds another run (never overwritten unless asked);
- :func:`instantiate_checked`: a component argument its class does not take (with the closest one it does);
- :func:`check_checkpoint_matches_model`: an HF checkpoint whose ``config.json`` disagrees with the configured
  model or ``model_type`` (which would otherwise load a scrambled model silently);
- :func:`check_token_ids`: token ids the model's vocabulary does not have (tokenizer and model do not match).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config

from rao_tune.training.checkpoint import (CHECKPOINTS_DIR, SETTING_DEFAULTS, STAGING_DIR, complete_checkpoints,
                                       read_trainer_state)
from rao_tune.training.metrics import METRICS_FILE

log = logging.getLogger(__name__)

# Keys every training recipe reads (DistributedRecipe); recipes add their own.
COMMON_KEYS = frozenset({
    "output_dir", "device", "dtype", "seed", "epochs", "max_steps_per_epoch", "gradient_accumulation_steps",
    "clip_grad_norm", "log_every_n_steps", "resume_from_checkpoint", "overwrite", "metric_logger", "checkpointer",
    "model", "tokenizer", "dataset", "optimizer", "lr_scheduler", "batch_size", "shuffle", "loss",
    "enable_activation_checkpointing", "fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers",
    "compile", "save_every_n_steps", "keep_last_n", "async_checkpoint", "optimizer_in_bwd",
})
_AT_LEAST_ONE = ("epochs", "batch_size", "gradient_accumulation_steps")
_NONE_OR_AT_LEAST_ONE = ("max_steps_per_epoch", "save_every_n_steps", "keep_last_n", "log_every_n_steps",
                         "eval_every_n_steps", "eval_batch_size")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w]*)")


def _closest(name: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def interpolation_variables(cfg: DictConfig) -> set[str]:
    """Top-level keys that other values interpolate (``assets_dir``, ``sft_dir``, ...): settings for the config
    itself, not for the recipe."""
    text = json.dumps(OmegaConf.to_container(cfg, resolve=False))
    return set(_INTERPOLATION.findall(text))


def check_config(cfg: DictConfig, known_keys: Iterable[str], recipe_name: str) -> None:
    """Unknown top-level keys, counts below 1 and a missing device, before anything starts."""
    known = set(known_keys)
    variables = interpolation_variables(cfg)
    for key in cfg:
        if key not in known and key not in variables:
            raise ValueError(
                f"config: {recipe_name} does not read the key '{key}'{_closest(key, known)} "
                "(a misspelt key would be ignored; remove it or fix its name)"
            )
    for key in _AT_LEAST_ONE:
        if key in cfg and not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"config: {key} must be an integer >= 1, got {cfg[key]!r}")
    for key in _NONE_OR_AT_LEAST_ONE:
        if cfg.get(key) is not None and not (isinstance(cfg[key], int) and cfg[key] >= 1):
            raise ValueError(f"config: {key} must be null or an integer >= 1, got {cfg[key]!r}")
    if cfg.get("optimizer_in_bwd", False):
        if cfg.get("clip_grad_norm") is not None:
            raise ValueError("config: optimizer_in_bwd=True steps each parameter inside backward, before every "
                             "gradient's norm is known: set clip_grad_norm=null")
        if cfg.get("gradient_accumulation_steps", 1) != 1:
            raise ValueError("config: optimizer_in_bwd=True steps after every backward: set gradient_accumulation_steps=1 "
                             "(raise batch_size instead)")
    device = str(cfg.get("device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config: device={device} but no CUDA GPU is visible to this process; use device=cpu")


def check_output_dir(cfg: DictConfig) -> Optional[Path]:
    """A run folder holds at most one run. Returns the checkpoint to resume from, or None for a fresh run.

    ``resume_from_checkpoint``: True resumes the newest complete step checkpoint (there must be one); ``auto``
    resumes it if there is one and starts fresh otherwise (for jobs that a scheduler may requeue). ``overwrite=True``
    clears a previous run's checkpoints, exports, ``metrics.jsonl`` and logs first (its precomputed reference
    log-probs and anything else in the folder stay)."""
    output_dir = Path(cfg.output_dir)
    checkpoints = complete_checkpoints(output_dir)
    resume = cfg.get("resume_from_checkpoint", False)
    if resume not in (True, False, "auto"):
        raise ValueError(f"config: resume_from_checkpoint must be True, False or auto, got {resume!r}")
    if resume is True and not checkpoints:
        raise ValueError(
            f"resume_from_checkpoint=True but {output_dir / CHECKPOINTS_DIR} holds no complete checkpoint "
            "(a run saves one every save_every_n_steps steps and at each epoch end); resume_from_checkpoint=auto "
            "starts fresh in that case"
        )
    if resume and checkpoints:
        check_resume_settings(cfg, checkpoints[-1])
        return checkpoints[-1]
    previous = _previous_run(cfg, output_dir)
    if previous and not cfg.get("overwrite", False):
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(p.name for p in previous)}): resume it with "
            "resume_from_checkpoint=True, replace it with overwrite=True, or choose another output_dir"
        )
    if previous and _is_launch_rank_zero():  # before the process group starts: only one process deletes
        for stale in previous:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        log.warning("overwrite=True: cleared the previous run in %s", output_dir)
    return None


def _previous_run(cfg: DictConfig, output_dir: Path) -> list[Path]:
    """What a run leaves in its folder: step checkpoints (complete or not), HF exports, its ``metrics.jsonl``, and
    its logs when they live in a folder of their own inside ``output_dir`` (a log folder elsewhere may be shared:
    never touched). Empty folders and an empty metrics file (a run that stopped before logging) do not count."""
    found = [output_dir / CHECKPOINTS_DIR, output_dir / STAGING_DIR, *output_dir.glob("epoch_*"),
             *output_dir.glob("step_*_hf")]
    log_dir = cfg.get("metric_logger", {}).get("log_dir", None)
    if log_dir is not None and output_dir.resolve() in Path(str(log_dir)).resolve().parents:
        found.append(Path(str(log_dir)))
    found.append(output_dir / METRICS_FILE)
    try:  # another launch process may be clearing the folder right now (overwrite=True)
        return [path for path in found
                if (path.is_dir() and any(path.iterdir())) or (path.is_file() and path.stat().st_size)]
    except FileNotFoundError:
        return []


def check_resume_settings(cfg: DictConfig, checkpoint: Path) -> None:
    """The settings that fix the data order and the LR schedule, as far as the config states them, must be the
    checkpoint's (the recipe checks the rest, e.g. the number of processes, once it knows them)."""
    saved = read_trainer_state(checkpoint)
    stated = {"seed": cfg.get("seed"), "total_epochs": cfg.get("epochs"),
              "max_steps_per_epoch": cfg.get("max_steps_per_epoch"), "batch_size": cfg.get("batch_size"),
              "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps"),
              "optimizer_in_bwd": bool(cfg.get("optimizer_in_bwd", False))}
    if stated["seed"] is None:  # a null seed is drawn at random: a resume continues with the one drawn then
        stated["seed"] = saved["seed"]
    refuse_changed_settings(checkpoint, saved, stated)


def refuse_changed_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Name every setting of ``current`` that differs from the one ``checkpoint`` was written with."""
    saved = {**SETTING_DEFAULTS, **saved}
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in current.items() if saved.get(key) != value]
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} was written with other settings {', '.join(changed)}; resume "
            "with the original ones (they fix the data order and the LR schedule)"
        )


def finished(checkpoint: Optional[Path], total_epochs: int) -> bool:
    """Whether ``checkpoint`` is the end of a run of ``total_epochs``."""
    return checkpoint is not None and read_trainer_state(checkpoint)["progress"]["epoch"] >= total_epochs


def _is_launch_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def instantiate_checked(cfg_node: DictConfig, *args: Any, what: str) -> Any:
    """``config.instantiate`` that names a misspelt argument and the closest one the component takes."""
    try:
        return config.instantiate(cfg_node, *args)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None:
            raise
        component = _resolve(cfg_node._component_)
        accepted = [name for name in inspect.signature(component).parameters if name not in ("self", "args", "kwargs")]
        raise ValueError(
            f"config: {what}._component_={cfg_node._component_} takes no argument '{match.group(1)}'"
            f"{_closest(match.group(1), accepted)} (it takes: {', '.join(accepted)})"
        ) from None


def _resolve(path: str) -> Any:
    module_path, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_path), name)


# HF config.json's model_type for each torchtune checkpointer model_type that we check.
_HF_MODEL_TYPES = {"LLAMA3": {"llama"}, "LLAMA2": {"llama"}, "LLAMA3_2": {"llama"}, "QWEN2": {"qwen2"},
                   "MISTRAL": {"mistral"}, "GEMMA": {"gemma"}, "GEMMA2": {"gemma2"}, "PHI3_MINI": {"phi3"}}


def model_shape(model: nn.Module) -> dict[str, int]:
    """The dimensions of a torchtune decoder (on the meta device is fine) that an HF ``config.json`` states."""
    attention, mlp = model.layers[0].attn, model.layers[0].mlp
    return {
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": model.tok_embeddings.embedding_dim,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": attention.num_heads,
        "num_key_value_heads": attention.num_kv_heads,
        "intermediate_size": mlp.w1.weight.shape[0],  # (a LoRALinear has no out_features)
    }


def check_checkpoint_matches_model(cfg_checkpointer: DictConfig, model: nn.Module) -> None:
    """The checkpoint's ``config.json`` must describe the configured model and the checkpointer's ``model_type``:
    a mismatch would load (or fail to load, after minutes) a model that is not the one asked for."""
    config_path = Path(cfg_checkpointer.checkpoint_dir) / "config.json"
    if not config_path.is_file():
        return
    hf_config = json.loads(config_path.read_text())
    model_type = str(cfg_checkpointer.get("model_type", ""))
    expected_types = _HF_MODEL_TYPES.get(model_type)
    if expected_types and hf_config.get("model_type") not in expected_types:
        hint = [name for name, types in _HF_MODEL_TYPES.items() if hf_config.get("model_type") in types]
        raise ValueError(
            f"checkpointer.model_type={model_type} but {config_path} is a '{hf_config.get('model_type')}' model "
            f"({', '.join(hf_config.get('architectures', []))}){f'; use model_type={hint[0]}' if hint else ''}"
        )
    for field, value in model_shape(model).items():
        if field in hf_config and hf_config[field] != value:
            raise ValueError(
                f"{config_path} has {field}={hf_config[field]} but the configured model has {value}: "
                "the model component does not match this checkpoint"
            )


def check_token_ids(max_token_id: int, model: nn.Module, origin: str) -> None:
    vocab_size = model.tok_embeddings.num_embeddings
    if max_token_id >= vocab_size:
        raise ValueError(
            f"{origin}: the tokenizer produced token id {max_token_id} but the model's vocabulary has {vocab_size} "
            "entries: tokenizer and model do not belong together"
        )
