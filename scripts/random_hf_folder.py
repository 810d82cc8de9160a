"""Write an HF Llama folder with a real model's shape and random weights, for benchmarks at shapes no hub can
give us here (``benchmark_efficiency.py --checkpoint-dir``, which reads the shape from its ``config.json``).

    python scripts/random_hf_folder.py --shape llama3.2-1b --out runs/shapes/llama3.2-1b

Shapes (layers, dim, heads / KV heads, intermediate, vocabulary, tied input/output embeddings) are the named
models' ``config.json`` values; rope is plain (theta 500000, no llama3 scaling: it does not change the cost).
Needs transformers (the ``test`` or ``real`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {
    # meta-llama/Llama-3.2-1B: 1.24B parameters
    "llama3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    # HuggingFaceTB/SmolLM2-135M: 135M parameters (the real folder is at hand; this is for sizes without it)
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
}


def write_random_hf_folder(shape: str, out_dir: Path, *, dtype: str = "bfloat16", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                         eos_token_id=2, torch_dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialise in the saved dtype: half the memory of fp32
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, safe_serialization=True)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters ({dtype}) -> {out_dir}")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_hf_folder(args.shape, args.out, dtype=args.dtype, seed=args.seed)


if __name__ == "__main__":
    main()
