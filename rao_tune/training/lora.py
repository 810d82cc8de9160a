"""LoRA and QLoRA with torchtune's LoRA model builders: which weights train, how adapters start, how they leave.

A config turns LoRA on by naming a LoRA builder as its model (``torchtune.models.llama3.lora_llama3_8b``,
``lora_qwen2_5_7b_base``, or ``lora_llama3`` with EuroLLM's sizes; ``quantize_base: True`` for QLoRA, the base
stored in torchao's NF4). Then only the adapters train (and a reward model's new score head, see
:func:`new_heads`); the base is frozen, so the reference model of a preference loss is the policy with its adapters
switched off (:func:`torchtune.modules.peft.disable_adapter`) and no second model is built.

Each ``LoRALinear`` adds ``(alpha / rank) * B A x`` to its frozen ``W x``. Adapters start from a seed, not from
the process's RNG, so a run starts from the same adapters whatever the number of processes: ``A`` uniform in
+-1/sqrt(in_dim) (torchtune's Kaiming-uniform with a = sqrt(5)) and ``B = 0``, so the starting model is the base
model exactly. Exports merge ``W + (alpha / rank) B A`` into an HF checkpoint and write the adapters alone in
PEFT's format (:func:`write_peft_adapter`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from torchtune.models import convert_weights
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.modules.peft import LoRALinear, set_trainable_params

from rao_tune.models.reward import ScoreHead

ADAPTER_DIR = "adapter"  # epoch_N/adapter/: PEFT files, kept out of the merged model's folder (see write_peft_adapter)
# torchtune's LoRA module names -> the HF module names PEFT targets
_PEFT_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                 "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}


@dataclass(frozen=True)
class LoraSettings:
    """What merging and PEFT need to know of a model's adapters (one rank and alpha for all, as the builders make)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # torchtune names of the adapted linears, e.g. ("q_proj", "v_proj")


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_settings(model: nn.Module) -> Optional[LoraSettings]:
    """The model's adapter settings, or None for a model without adapters (full fine-tuning)."""
    modules = adapter_modules(model)
    if not modules:
        return None
    if any(hasattr(module, "magnitude") for module in modules.values()):
        raise ValueError("DoRA (use_dora=True) is not supported: set use_dora: False in the model config")
    ranks = {module.rank for module in modules.values()}
    alphas = {module.alpha for module in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters of mixed rank {sorted(ranks)} or alpha {sorted(alphas)} cannot be merged")
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
    return LoraSettings(rank=ranks.pop(), alpha=float(alphas.pop()), targets=targets)


def initial_adapter_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Starting adapter weights as full CPU tensors, drawn from their own generator: ``lora_a`` uniform in
    +-1/sqrt(in_dim), ``lora_b`` zero (so the adapted model starts as the base model)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in sorted(adapter_modules(model).items()):
        bound = 1.0 / math.sqrt(module.in_dim)
        state[f"{name}.lora_a.weight"] = torch.empty(module.rank, module.in_dim).uniform_(-bound, bound, generator=generator)
        state[f"{name}.lora_b.weight"] = torch.zeros(module.out_dim, module.rank)
    return state


def new_heads(model: nn.Module) -> dict[str, str]:
    """Weights that did not come with the base and train whole beside the adapters, torchtune name -> HF name:
    a reward model's score head (drawn fresh, it has nothing to adapt)."""
    return {"output.weight": "score.weight"} if isinstance(model.output, ScoreHead) else {}


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Adapters (and :func:`new_heads`) train; the base is frozen."""
    trainable = {
        f"{name}.{param_name}": param
        for name, module in adapter_modules(model).items()
        for param_name, param in module.named_parameters()
        if "lora_" in param_name
    }
    parameters = dict(model.named_parameters())
    trainable.update({name: parameters[name] for name in new_heads(model)})
    set_trainable_params(model, trainable)


def merge_adapters(full_state: dict[str, torch.Tensor], settings: LoraSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a gathered state dict into ``(merged, adapters)``: the base weights with ``(alpha / rank) B A`` added
    (the model's own names and shapes, ready for the HF checkpointer), and the adapter weights alone.

    Out of place, in fp32, back to the base's dtype: a gathered tensor can be the live parameter itself (one
    process, CPU), which an in-place merge (torchtune's ``get_merged_lora_ckpt``) would change under training.
    """
    scale = settings.alpha / settings.rank
    adapters = {name: tensor for name, tensor in full_state.items() if ".lora_" in name}
    merged = {name: tensor for name, tensor in full_state.items() if ".lora_" not in name}
    for name in (n for n in adapters if n.endswith(".lora_a.weight")):
        module = name[: -len(".lora_a.weight")]
        base = merged[f"{module}.weight"]
        delta = adapters[f"{module}.lora_b.weight"].float() @ adapters[name].float()
        merged[f"{module}.weight"] = (base.float() + scale * delta).to(base.dtype)
    return merged, adapters


def write_peft_adapter(
    adapters: dict[str, torch.Tensor],
    out_dir: Path,
    settings: LoraSettings,
    *,
    tune_to_hf: Callable[..., dict[str, torch.Tensor]],
    shape_args: dict[str, Any],
    base_model: str,
    task_type: str = "CAUSAL_LM",
    modules_to_save: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT reads them (``PeftModel
    .from_pretrained(base, out_dir)``).

    Names and row order follow the same ``tune_to_hf`` conversion as the merged weights: converting a stand-in
    weight whose rows hold their own index shows where each output row of ``W`` lands in HF's layout (Llama's q/k
    rows are permuted for HF's rotary embedding, Qwen2's are not), and ``B`` (output rows x rank) moves the same way;
    ``A`` acts on the input and keeps its layout. ``modules_to_save``: HF-named weights PEFT restores whole (a
    reward model's ``score.weight``). The folder is separate from the merged model's: transformers would otherwise
    take the merged folder for an adapter and go looking for ``base_model`` when loading it.
    """
    peft_state: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in adapters if n.endswith(".lora_a.weight")):
        module = name[: -len(".lora_a.weight")]
        lora_a, lora_b = adapters[name], adapters[f"{module}.lora_b.weight"]
        row_index = torch.arange(lora_b.shape[0], dtype=torch.float64)[:, None].expand(-1, lora_a.shape[1])
        (hf_name, rows), = tune_to_hf({f"{module}.weight": row_index.clone()}, **shape_args).items()
        hf_module = hf_name[: -len(".weight")]
        peft_state[f"base_model.model.{hf_module}.lora_A.weight"] = lora_a.contiguous()
        peft_state[f"base_model.model.{hf_module}.lora_B.weight"] = lora_b[rows[:, 0].long()].contiguous()
    for hf_name, tensor in (modules_to_save or {}).items():
        peft_state[f"base_model.model.{hf_name}"] = tensor.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(peft_state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(_PEFT_TARGETS[target] for target in settings.targets),
        "modules_to_save": sorted({name.rsplit(".", 1)[0] for name in modules_to_save or {}}) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")


@dataclass(frozen=True)
class AdapterExport:
    """How a LoRA run's exports are written: the merged model through the run's HF checkpointer, the adapters
    (and ``modules_to_save``, torchtune name -> HF name) in PEFT format beside it, in ``epoch_N/adapter``."""

    settings: LoraSettings
    model_type: str
    shape_args: dict[str, Any]
    base_model: str
    task_type: str
    modules_to_save: dict[str, str]

    @classmethod
    def for_model(cls, model: nn.Module, cfg_checkpointer: Any) -> Optional["AdapterExport"]:
        """None for a model without adapters. The HF shapes come from the starting checkpoint's ``config.json``;
        a reward model's adapter is a sequence-classification one with its score head saved whole."""
        settings = lora_settings(model)
        if settings is None:
            return None
        hf_config = json.loads((Path(cfg_checkpointer.checkpoint_dir) / "config.json").read_text())
        shape_args = {"num_heads": hf_config["num_attention_heads"], "num_kv_heads": hf_config["num_key_value_heads"],
                      "dim": hf_config["hidden_size"], "head_dim": hf_config.get("head_dim")}
        return cls(settings, str(cfg_checkpointer.get("model_type", "LLAMA3")), shape_args,
                   str(Path(cfg_checkpointer.checkpoint_dir).resolve()),
                   "SEQ_CLS" if new_heads(model) else "CAUSAL_LM", new_heads(model))

    def split(self, full_state: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, Any]:
        """Write the PEFT adapter to ``adapter_dir``; return the merged state dict for the HF checkpointer."""
        merged, adapters = merge_adapters(full_state, self.settings)
        write_peft_adapter(
            adapters, adapter_dir, self.settings,
            tune_to_hf=qwen2_tune_to_hf if self.model_type == "QWEN2" else convert_weights.tune_to_hf,
            shape_args=self.shape_args, base_model=self.base_model, task_type=self.task_type,
            modules_to_save={hf: merged[tune] for tune, hf in self.modules_to_save.items()},
        )
        return merged
