"""Any Hugging Face Llama or Qwen2 checkpoint folder as a torchtune decoder, its shape read from ``config.json``.

torchtune builds a model from a named builder per size (``llama3_2_1b``, ``qwen2_5_7b_base``, ...); a fine-tune or
a model torchtune does not list (SmolLM2, TinyLlama, a 0.5B Qwen2.5 instruct) needs its sizes copied into YAML by
hand. :func:`hf_model` reads them from the folder instead and calls torchtune's own component builders
(``llama3_2``: Llama blocks, tied or untied output, Llama-3.1 rope scaling or none; ``qwen2``: q/k/v biases), so
the weights load with torchtune's checkpointer (``model_type: LLAMA3_2`` or ``QWEN2``) and train with every
recipe, LoRA included (:func:`lora_hf_model`), and reward or value models wrap it like any decoder
(``rao_tune.models.reward_model`` with ``decoder: rao_tune.models.hf_model``).

A ``config.json`` field the builders cannot honour (another activation, attention or MLP biases on Llama, a
head_dim other than hidden_size / heads, another rope scaling, Qwen2's sliding window) is refused by name rather
than built into a model whose logits would differ from ``transformers``'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2

_FAMILIES = {  # config.json "model_type" -> (builder, LoRA builder, torchtune checkpointer model_type)
    "llama": (llama3_2, lora_llama3_2, "LLAMA3_2"),
    "qwen2": (qwen2, lora_qwen2, "QWEN2"),
}
# What torchtune's Llama3ScaledRoPE assumes unless told otherwise (and Llama 3.1/3.2 ship).
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(checkpoint_dir: Union[str, Path]) -> dict[str, Any]:
    """``checkpoint_dir/config.json`` as a dict (a clear error when it is missing)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: hf_model reads the model's shape from an HF folder's config.json")
    return json.loads(path.read_text())


def _rope(config: dict, where: str) -> tuple[float, Optional[dict]]:
    """(rope theta, rope scaling or None) from either spelling: transformers < 5 (``rope_theta``,
    ``rope_scaling``) or transformers 5 (``rope_parameters``)."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or parameters
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{where}: rope scaling '{kind}' is not supported (only none and Llama 3.1's 'llama3')")
    return float(theta), scaling


def hf_model_type(checkpoint_dir: Union[str, Path]) -> str:
    """The ``model_type`` torchtune's ``FullModelHFCheckpointer`` needs for this folder: LLAMA3_2 or QWEN2."""
    config = read_hf_config(checkpoint_dir)
    return _family(config, Path(checkpoint_dir) / "config.json")[2]


def _family(config: dict, where: Path) -> tuple:
    family = _FAMILIES.get(config.get("model_type"))
    if family is None:
        raise ValueError(f"{where}: model_type '{config.get('model_type')}' is not supported; hf_model builds "
                         f"{sorted(_FAMILIES)} ({', '.join(config.get('architectures') or [])})")
    return family


def _decoder_kwargs(config: dict, where: Path, max_seq_len: Optional[int]) -> tuple[dict, Optional[dict]]:
    """The builder's keyword arguments and the Llama-3.1 rope scaling (None: none) for ``config``."""
    num_heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    refused = []
    if config.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act={config['hidden_act']}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != hidden // num_heads:
        refused.append(f"head_dim={head_dim} (torchtune's builders use hidden_size / num_attention_heads)")
    if config.get("model_type") == "llama":
        refused += [f"{key}=True" for key in ("attention_bias", "mlp_bias") if config.get(key)]
    if config.get("model_type") == "qwen2" and config.get("use_sliding_window"):
        refused.append("use_sliding_window=True")
    theta, scaling = _rope(config, str(where))
    if scaling is not None and config.get("model_type") != "llama":
        refused.append("rope scaling on a Qwen2 model")
    if refused:
        raise ValueError(f"{where}: not supported by hf_model: {', '.join(refused)}")
    kwargs = {
        "vocab_size": config["vocab_size"],
        "num_layers": config["num_hidden_layers"],
        "num_heads": num_heads,
        "num_kv_heads": config.get("num_key_value_heads") or num_heads,
        "embed_dim": hidden,
        "intermediate_dim": config["intermediate_size"],
        "max_seq_len": max_seq_len or config.get("max_position_embeddings", 4096),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_base": theta,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    if config.get("model_type") == "llama":
        # Llama3ScaledRoPE with scale factor 1 is plain RoPE (every frequency divided by 1).
        kwargs["scale_factor"] = scaling["factor"] if scaling else 1
    return kwargs, scaling


def _set_rope_scaling(model: nn.Module, scaling: Optional[dict], kwargs: dict) -> None:
    """llama3_2 passes only the scale factor to Llama3ScaledRoPE; a checkpoint with other frequency factors gets
    a rope built with all of them, shared by every layer as the builder shares its own."""
    if scaling is None or all(scaling.get(key, value) == value for key, value in _LLAMA3_ROPE_DEFAULTS.items()):
        return
    rope = Llama3ScaledRoPE(
        dim=kwargs["embed_dim"] // kwargs["num_heads"], max_seq_len=kwargs["max_seq_len"], base=kwargs["rope_base"],
        scale_factor=scaling["factor"], low_freq_factor=scaling.get("low_freq_factor", 1.0),
        high_freq_factor=scaling.get("high_freq_factor", 4.0),
        old_context_len=scaling.get("original_max_position_embeddings", 8192),
    )
    for layer in model.layers:
        layer.attn.pos_embeddings = rope


def hf_model(checkpoint_dir: str, max_seq_len: Optional[int] = None) -> nn.Module:
    """torchtune decoder with the shape of the HF Llama or Qwen2 checkpoint in ``checkpoint_dir`` (its weights are
    loaded by the checkpointer, as for any builder). ``max_seq_len``: the rope cache length (None: the config's
    ``max_position_embeddings``).

    YAML::

        model:
          _component_: rao_tune.models.hf_model
          checkpoint_dir: ${model_dir}
        checkpointer:
          _component_: torchtune.training.FullModelHFCheckpointer
          checkpoint_dir: ${model_dir}
          model_type: LLAMA3_2   # QWEN2 for a Qwen2 folder (rao_tune.models.hf_model_type tells)
    """
    config = read_hf_config(checkpoint_dir)
    where = Path(checkpoint_dir) / "config.json"
    builder, _, _ = _family(config, where)
    kwargs, scaling = _decoder_kwargs(config, where, max_seq_len)
    model = builder(**kwargs)
    _set_rope_scaling(model, scaling, kwargs)
    return model


def lora_hf_model(
    checkpoint_dir: str,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    max_seq_len: Optional[int] = None,
) -> nn.Module:
    """:func:`hf_model` with torchtune's LoRA (or QLoRA with ``quantize_base``) adapters, as torchtune's
    ``lora_llama3_2`` / ``lora_qwen2`` builders place them."""
    config = read_hf_config(checkpoint_dir)
    where = Path(checkpoint_dir) / "config.json"
    _, lora_builder, _ = _family(config, where)
    kwargs, scaling = _decoder_kwargs(config, where, max_seq_len)
    model = lora_builder(
        lora_attn_modules=list(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base, **kwargs,
    )
    _set_rope_scaling(model, scaling, kwargs)
    return model
