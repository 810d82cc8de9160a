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
    "compile", "save_every_n_steps", "keep_last_n", "async_checkpoint", "optimizer_in_bwd", "save_on_signal",
    "resume_allow_changes",
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
    check_checkpoint_dirs(cfg)
    device = str(cfg.get("device", "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config: device={device} but no CUDA GPU is visible to this process; use device=cpu")


def check_checkpoint_dirs(cfg: DictConfig) -> None:
    """Every configured checkpointer's ``checkpoint_dir`` exists, named by its key (and the variable it comes
    from), before anything starts: not after minutes of loading the models configured before it."""
    for key in cfg:
        node = cfg.get(key)
        if not (str(key).endswith("checkpointer") and isinstance(node, DictConfig) and "checkpoint_dir" in node):
            continue
        folder = Path(str(node.checkpoint_dir))
        if not folder.is_dir():
            written = OmegaConf.to_container(node, resolve=False)["checkpoint_dir"]
            source = f" (= {written})" if str(written) != str(folder) else ""
            raise ValueError(f"config: {key}.checkpoint_dir{source} is {folder}, which is not a folder")


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
            "(a run saves one every save_every_n_steps steps, at each epoch end and on a preemption signal); "
            "resume_from_checkpoint=auto starts fresh in that case"
        )
    if resume and checkpoints:
        check_resume_settings(cfg, checkpoints[-1])
        return checkpoints[-1]
    previous = _previous_run(cfg, output_dir)
    # auto and no checkpoint: a run that died before its first one left only logs and metrics, nothing a resume
    # could use; its exports (if any) are kept and refused below like any other run's.
    restartable = resume == "auto" and not any(path.name.startswith(("epoch_", "step_")) for path in previous)
    if previous and not cfg.get("overwrite", False) and not restartable:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(p.name for p in previous)}): resume it with "
            "resume_from_checkpoint=True, replace it with overwrite=True, or choose another output_dir"
        )
    if previous and is_launch_rank_zero():  # before the process group starts: only one process deletes
        _remove(previous)
        log.warning("%s: cleared the previous run in %s (%s)",
                    "overwrite=True" if cfg.get("overwrite", False) else "resume_from_checkpoint=auto without a checkpoint",
                    output_dir, ", ".join(path.name for path in previous))
    return None


def clear_failed_start(cfg: DictConfig) -> None:
    """Remove what a fresh start that failed before its first step wrote (metrics, logs in ``output_dir``), so the
    folder does not "hold a run" for the next start. The caller knows the folder held none when it began."""
    previous = _previous_run(cfg, Path(cfg.output_dir))
    _remove([path for path in previous if not path.name.startswith(("epoch_", "step_"))])


def _remove(paths: Iterable[Path]) -> None:
    for stale in paths:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


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


# What a resume must not change silently (compared before anything loads): these config nodes and keys, leaf by
# leaf, except where files live (folders move between clusters). ``resume_allow_changes`` names deliberate changes.
RESUME_COMPARED = ("loss", "optimizer", "lr_scheduler", "model", "shuffle", "clip_grad_norm", "dtype", "value_lr",
                   "samples_per_prompt", "max_generated_tokens", "missing_eos_score", "kl_coeff", "gamma", "lmbda")
_WHERE_FILES_LIVE = re.compile(r"(^|_)(dir|path|paths|files?)$")


def config_settings(cfg: DictConfig) -> dict[str, Any]:
    """The compared part of ``cfg`` as flat ``dotted.key -> value`` (what a step checkpoint records)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if not _WHERE_FILES_LIVE.search(str(key)):
                    visit(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value

    for key in RESUME_COMPARED:
        if key in cfg:
            visit(key, OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key])
    return flat


_UNSET = "(unset)"


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved, now)`` for each key set in either that differs."""
    return [(key, saved.get(key, _UNSET), current.get(key, _UNSET)) for key in sorted(set(saved) | set(current))
            if saved.get(key, _UNSET) != current.get(key, _UNSET)]


def refuse_unallowed_changes(checkpoint: Path, changes: list[tuple[str, Any, Any]], allowed: Iterable[str]) -> None:
    """Refuse ``changes`` (``(key, old, new)``) unless ``resume_allow_changes`` names each key or a node above it;
    the allowed ones are logged."""
    allowed = [allowed] if isinstance(allowed, str) else [str(name) for name in allowed or ()]

    def covered(key: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in allowed)

    refused = [(key, old, new) for key, old, new in changes if not covered(key)]
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} was written with other settings ({listed}); resume with the "
            f"original ones, or name the changes you mean in resume_allow_changes=[{', '.join(k for k, _, _ in refused)}]"
        )
    for key, old, new in changes:
        log.warning("resume_from_checkpoint: allowed change %s: %r -> %r", key, old, new)


def check_resume_settings(cfg: DictConfig, checkpoint: Path) -> None:
    """The settings that fix the data order and the LR schedule, and the loss, optimizer, schedule and model
    settings, as far as the config states them, must be the checkpoint's unless ``resume_allow_changes`` names
    them (the recipe checks the data's fingerprint once the data is read)."""
    saved = read_trainer_state(checkpoint)
    if "config_settings" in saved:  # (checkpoints written before it was recorded: not compared)
        refuse_unallowed_changes(checkpoint, changed_settings(saved["config_settings"], config_settings(cfg)),
                                 cfg.get("resume_allow_changes", None))
    stated = {"seed": cfg.get("seed"), "total_epochs": cfg.get("epochs"),
              "max_steps_per_epoch": cfg.get("max_steps_per_epoch"), "batch_size": cfg.get("batch_size"),
              "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps"),
              "optimizer_in_bwd": bool(cfg.get("optimizer_in_bwd", False))}
    if stated["seed"] is None:  # a null seed is drawn at random: a resume continues with the one drawn then
        stated["seed"] = saved["seed"]
    stated["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = absorbed_accumulation(saved, stated)
    if accumulation != stated["gradient_accumulation_steps"]:
        log.warning(
            "resume_from_checkpoint: %d processes instead of %d; gradient_accumulation_steps %s -> %d keeps the global "
            "batch of %d prompts (batch_size %s per process)", stated["world_size"], saved["world_size"],
            stated["gradient_accumulation_steps"], accumulation, global_batch(saved), stated["batch_size"])
        cfg.gradient_accumulation_steps = stated["gradient_accumulation_steps"] = accumulation
        if stated["optimizer_in_bwd"] and accumulation != 1:
            raise ValueError(
                f"resume_from_checkpoint: {checkpoint} had a global batch of {global_batch(saved)} prompts; with "
                f"{stated['world_size']} processes and optimizer_in_bwd=True (no accumulation) set "
                f"batch_size={global_batch(saved) // stated['world_size']}")
    refuse_changed_settings(checkpoint, saved, stated)


# A step checkpoint resumes on another number of processes: model and optimizer reshard through DCP, and every
# optimizer step covers the same global batch of the seeded permutation (positions [s G, (s + 1) G) of it, whatever
# the processes), so only the product G of these three must stay.
ELASTIC_SETTINGS = ("world_size", "batch_size", "gradient_accumulation_steps")


def global_batch(settings: dict[str, Any]) -> int:
    return settings["world_size"] * settings["batch_size"] * settings["gradient_accumulation_steps"]


def absorbed_accumulation(saved: dict[str, Any], current: dict[str, Any]) -> int:
    """The gradient accumulation that keeps ``saved``'s global batch with ``current``'s processes and batch size,
    when the configured one does not and the process count changed (else the configured one)."""
    if current["world_size"] == saved["world_size"] or global_batch(saved) == global_batch(current):
        return current["gradient_accumulation_steps"]
    per_step = current["world_size"] * current["batch_size"]
    return global_batch(saved) // per_step if global_batch(saved) % per_step == 0 else current["gradient_accumulation_steps"]


def refuse_changed_settings(checkpoint: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Name every setting of ``current`` that differs from the one ``checkpoint`` was written with (the process
    count, batch size and accumulation only through their product, the global batch)."""
    saved = {**SETTING_DEFAULTS, **saved}
    changed = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in current.items()
               if key not in ELASTIC_SETTINGS and saved.get(key) != value]
    if all(key in current and key in saved for key in ELASTIC_SETTINGS) and global_batch(saved) != global_batch(current):
        changed.append(
            f"global batch (processes x batch_size x gradient_accumulation_steps) = {saved['world_size']} x "
            f"{saved['batch_size']} x {saved['gradient_accumulation_steps']} (now {current['world_size']} x "
            f"{current['batch_size']} x {current['gradient_accumulation_steps']})"
        )
    if changed:
        raise ValueError(
            f"resume_from_checkpoint: {checkpoint} was written with other settings {', '.join(changed)}; resume "
            "with the original ones (they fix the data order and the LR schedule)"
        )


def finished(checkpoint: Optional[Path], total_epochs: int) -> bool:
    """Whether ``checkpoint`` is the end of a run of ``total_epochs``."""
    return checkpoint is not None and read_trainer_state(checkpoint)["progress"]["epoch"] >= total_epochs


def is_launch_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def instantiate_checked(cfg_node: DictConfig, *args: Any, what: str) -> Any:
    """``config.instantiate`` that names a misspelt argument and the closest one the component takes."""
    try:
        return config.instantiate(cfg_node, *args)
    except FileNotFoundError as err:
        raise ValueError(f"config: {what}: {err}") from None
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
