"""Estimate the GPU memory a training config needs per GPU for its weights, gradients and optimizer states under
FSDP full sharding, without a GPU: the config's model is built on the meta device and its parameters counted.

    python scripts/estimate_memory.py configs/llama3_8b_rao.yaml configs/llama3_8b_rao_lora.yaml
    python scripts/estimate_memory.py --gpus 8 --qlora configs/*_rao_lora.yaml

What is counted (bytes per parameter; the recipes build the model in the config's ``dtype``, bf16 = 2 bytes):

- weights: every parameter in its own dtype, or NF4 where the builder stores it so (``quantize_base: True``, the
  frozen linear weights of the decoder layers). torchao's NF4 (block 64, scaler block 256) stores 4 bits per
  weight, one int8 scaler per 64-weight block and one factor per 256 scalers, kept in the weight's dtype (bf16
  here, not fp32: checked on torchao 0.15's to_nf4): n/2 + n/64 + (n/16384) x 2 bytes, ~0.5157 bytes per weight
  (~4.13 bits). Embeddings, norms, biases, adapters and the output projection stay bf16.
- gradients: trainable parameters only, in their dtype. Trainable = all parameters for full fine-tuning; for a
  LoRA model (a LoRA builder named as the model) the adapters (parameter names containing ``lora_``) and a reward
  model's fresh score head ``output.weight``, as the recipes freeze them (``rao_tune.training.lora``).
- optimizer: AdamW / Adam keep two states (exp_avg, exp_avg_sq) per trainable parameter, created like the
  parameter, so in the parameter dtype: with ``dtype: bf16`` that is 2 x 2 bytes (the recipes keep no fp32 master
  weights or fp32 states). SGD: one momentum state if momentum is set, else none.
- reference: a preference loss that needs a reference and ``reference_logps: online`` keeps a second model's
  weights for the whole run (full fine-tuning, or LoRA with a ``ref_checkpointer``). ``precomputed`` loads it only
  before training, beside the policy's weights but before any gradient or optimizer state exists, then frees it:
  nothing during training. LoRA without ``ref_checkpointer`` uses the policy with its adapters off: never a
  second model.

Everything above is divided by the number of GPUs (FSDP2 full sharding; shard padding ignored). Not included in
the total: activations (they depend on batch size, sequence length and activation checkpointing), the unsharded
weights FSDP all-gathers during a step (shown in their own column: the root unit, i.e. the embedding, final norm
and output / score head, which FSDP keeps unsharded through forward and backward, plus two decoder layers,
the current one and the prefetched next), gradients before their reduce-scatter, temporary buffers, the CUDA
context (~0.5-1 GiB) and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rao_tune.training.lora import freeze_all_but_adapters, lora_settings  # noqa: E402

GIB = 1024**3
NF4_BLOCK = 64  # weights per int8 scaler (torchao's to_nf4 default, used by torchtune's LoRALinear / FrozenNF4Linear)
NF4_SCALER_BLOCK = 256  # scalers per quantization factor (one factor, in the weight's dtype, per 64 x 256 weights)
_LAYER = re.compile(r"^(.*\.)?layers\.(\d+)\.")


def nf4_bytes(numel: int, factor_bytes: int) -> float:
    """Bytes of one NF4 weight of ``numel`` elements: packed 4-bit codes, int8 block scalers, one factor per
    NF4_SCALER_BLOCK scalers (the 16-entry code table and scaler mean, a few bytes per tensor, are ignored)."""
    return numel / 2 + numel / NF4_BLOCK + numel / (NF4_BLOCK * NF4_SCALER_BLOCK) * factor_bytes


def is_nf4(param: torch.Tensor) -> bool:
    try:
        from torchao.dtypes.nf4tensor import NF4Tensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(param, NF4Tensor) or isinstance(getattr(param, "data", None), NF4Tensor)


def optimizer_states_per_param(cfg: DictConfig) -> int:
    component = str(cfg.get("optimizer", {}).get("_component_", "torch.optim.AdamW"))
    name = component.rsplit(".", 1)[-1].lower()
    if name in ("sgd",):
        return 1 if float(cfg.optimizer.get("momentum", 0) or 0) else 0
    if "adam" not in name:
        print(f"note: {component}: states per parameter unknown, assuming AdamW's 2", file=sys.stderr)
    return 2


def loss_needs_reference(cfg: DictConfig) -> bool:
    """Whether the config's loss uses a reference model (its class's ``needs_reference``; preference recipes only)."""
    if "reference_logps" not in cfg and "ref_checkpointer" not in cfg:
        return False  # SFT, reward model: no reference at all
    component = cfg.get("loss", {}).get("_component_")
    if component is None:
        return True
    module_path, _, name = str(component).rpartition(".")
    try:
        return bool(getattr(getattr(importlib.import_module(module_path), name), "needs_reference", True))
    except (ImportError, AttributeError):
        return True


@dataclass
class Estimate:
    name: str
    method: str  # "full", "LoRA", "QLoRA"
    gpus: int
    params: int
    trainable: int
    nf4_params: int
    weight_bytes: float
    grad_bytes: float
    optim_bytes: float
    ref_bytes: float
    ref_note: str
    gathered_bytes: float  # unsharded during a step: root unit + two decoder layers (not in the total)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.grad_bytes + self.optim_bytes + self.ref_bytes

    def per_gpu(self, value: float) -> float:
        return value / self.gpus / GIB


def estimate(cfg: DictConfig, name: str, gpus: int) -> Estimate:
    dtype = training.get_dtype(cfg.get("dtype", "fp32"), device=torch.device("cpu"))
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg.model)
    lora = lora_settings(model) is not None
    if lora:
        freeze_all_but_adapters(model)  # the recipes' own rule: adapters + a reward model's score head
    custom = set(cfg.get("custom_sharded_layers", None) or [])

    params = trainable = nf4_params = 0
    weight_bytes = grad_bytes = 0.0
    unit_bytes: dict[str, float] = {}  # FSDP unit -> unsharded bytes ("" is the root unit)
    for param_name, param in model.named_parameters():
        numel = param.numel()
        params += numel
        if is_nf4(param):
            nf4_params += numel
            stored = nf4_bytes(numel, param.element_size())  # the factors keep the weight's dtype
        else:
            stored = numel * param.element_size()
        weight_bytes += stored
        if param.requires_grad or not lora:
            trainable += numel
            grad_bytes += numel * param.element_size()
        match = _LAYER.match(param_name)
        unit = match.group(0) if match else next((c for c in custom if param_name.startswith(f"{c}.")), "")
        unit_bytes[unit] = unit_bytes.get(unit, 0.0) + stored
    elem = torch.tensor([], dtype=dtype).element_size()
    optim_bytes = optimizer_states_per_param(cfg) * trainable * elem

    ref_bytes, ref_note = 0.0, "none"
    if loss_needs_reference(cfg):
        mode = cfg.get("reference_logps", "precomputed")
        second_model = not lora or cfg.get("ref_checkpointer") is not None
        if not second_model:
            ref_note = "policy, adapters off"
        elif mode == "online":
            ref_bytes, ref_note = weight_bytes, "online: 2nd model"
        else:
            ref_note = "precomputed (freed before training)"
    layers = sorted((v for k, v in unit_bytes.items() if k), reverse=True)
    gathered = unit_bytes.get("", 0.0) + sum(layers[:2])
    quantized = bool(cfg.model.get("quantize_base", False))
    method = ("QLoRA" if quantized else "LoRA") if lora else "full"
    return Estimate(name, method, gpus, params, trainable, nf4_params, weight_bytes, grad_bytes, optim_bytes,
                    ref_bytes, ref_note, gathered)


def table(estimates: list[Estimate]) -> str:
    rows = ["| config | method | GPUs | params | trainable | NF4 params | weights | grads | AdamW | reference | "
            "total / GPU | FSDP gathered (not in total) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for e in estimates:
        ref = f"{e.per_gpu(e.ref_bytes):.2f} ({e.ref_note})" if e.ref_bytes else e.ref_note
        rows.append(
            f"| {e.name} | {e.method} | {e.gpus} | {e.params / 1e9:.3f} B | {e.trainable / 1e6:,.1f} M "
            f"({100 * e.trainable / e.params:.2f}%) | {e.nf4_params / 1e9:.3f} B | {e.per_gpu(e.weight_bytes):.2f} | "
            f"{e.per_gpu(e.grad_bytes):.2f} | {e.per_gpu(e.optim_bytes):.2f} | {ref} | "
            f"**{e.per_gpu(e.total_bytes):.2f}** | {e.gathered_bytes / GIB:.2f} |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="training configs (SFT, reward model, RAO, ...)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the model is sharded over (FSDP full sharding)")
    parser.add_argument("--qlora", action="store_true",
                        help="also estimate each LoRA config with model.quantize_base=True (QLoRA)")
    args = parser.parse_args(argv)

    estimates = []
    for path in args.configs:
        cfg = OmegaConf.load(path)
        estimates.append(estimate(cfg, path.stem, args.gpus))
        if args.qlora and estimates[-1].method == "LoRA":
            qcfg = OmegaConf.merge(cfg, OmegaConf.create({"model": {"quantize_base": True}}))
            estimates.append(estimate(qcfg, path.stem + " (quantize_base: True)", args.gpus))
    print(f"Estimated memory per GPU in GiB (2^30 bytes), FSDP full sharding over {args.gpus} GPUs: weights + "
          "gradients + AdamW states (+ a reference model kept for the whole run). NOT included: activations, "
          "the CUDA context, temporary buffers and fragmentation. 'FSDP gathered' is the unsharded weights a GPU "
          "holds during a step (embedding, final norm and output/score head, plus two decoder layers), in GiB, "
          "also not in the total.\n")
    print(table(estimates))


if __name__ == "__main__":
    main()
