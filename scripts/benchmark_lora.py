"""LoRA against full fine-tuning of the same model, data and loss: step time, throughput, peak memory and the size
of a step checkpoint, from ``tune run`` runs interleaved round by round (full, LoRA, full, LoRA, ...; the order
rotates each round), medians over rounds.

    python scripts/benchmark_lora.py --config configs/tiny_rao.yaml --rounds 3
    python scripts/benchmark_lora.py --config configs/tiny_rao.yaml --rounds 3 --shape 1024,8,16,8,2816,32000

``--shape embed_dim,layers,heads,kv_heads,intermediate_dim,vocab`` writes a random llama3 checkpoint of that shape
(no download) and runs both variants on it with the config's data. The LoRA variant switches the model to
``lora_llama3`` (rank 16, alpha 32, attention and MLP) by overrides; nothing else changes. On CPU the memory is the
process's peak RSS, which includes set-up: full fine-tuning builds the reference model for the precomputed
reference log-probs before training, LoRA scores them with its own adapters off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from benchmark_rao import run_once  # noqa: E402

LORA = ["model._component_=torchtune.models.llama3.lora_llama3", "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
        "model.apply_lora_to_mlp=True", "model.lora_rank=16", "model.lora_alpha=32"]
FIGURES = ("step_time_median_s", "tokens_per_second_median", "peak_rss_gib", "peak_memory_active_gib",
           "peak_memory_reserved_gib", "step_checkpoint_mib")


def shape_overrides(shape: str, out_dir: Path) -> list[str]:
    from rao_tune.toy.assets import build_llama3_checkpoint

    embed_dim, layers, heads, kv_heads, intermediate, vocab = (int(x) for x in shape.split(","))
    kwargs = build_llama3_checkpoint(out_dir, vocab_size=vocab, embed_dim=embed_dim, num_layers=layers,
                                     num_heads=heads, num_kv_heads=kv_heads, intermediate_dim=intermediate)
    return [f"model.{key}={kwargs[key]}" for key in ("vocab_size", "num_layers", "num_heads", "num_kv_heads",
                                                    "embed_dim", "intermediate_dim")] + [f"checkpointer.checkpoint_dir={out_dir}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny_rao.yaml", help="a full-fine-tuning config")
    parser.add_argument("--recipe", default="recipes/rao_distributed.py")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (one epoch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shape", default=None, help="embed,layers,heads,kv_heads,intermediate,vocab")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both variants, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rao_lora_bench_") as scratch:
        common = [f"epochs=1", f"max_steps_per_epoch={args.steps}", f"save_every_n_steps={args.steps - 1}",
                  *(shape_overrides(args.shape, Path(scratch) / "model") if args.shape else []), *args.overrides]
        variants = {"full": common, "lora": [*common, *LORA]}
        results: dict[str, list[dict]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            order = list(variants)[round_index % 2:] + list(variants)[: round_index % 2]
            for name in order:
                results[name].append(run_once(args.recipe, args.config, args.nproc, variants[name], warmup=args.warmup))

    table = {}
    for name, runs in results.items():
        table[name] = {figure: statistics.median(run[figure] for run in runs) for figure in FIGURES
                       if all(figure in run for run in runs)}
    print(json.dumps({"config": args.config, "shape": args.shape, "rounds": args.rounds, "steps": args.steps,
                      "medians": table, "runs": results}, indent=2))
    print(f"\n| figure | full | LoRA | LoRA / full |\n|---|---|---|---|")
    for figure in FIGURES:
        if figure in table["full"] and figure in table["lora"]:
            full, lora = table["full"][figure], table["lora"][figure]
            print(f"| {figure} | {full:.4g} | {lora:.4g} | {lora / full:.3f} |")


if __name__ == "__main__":
    main()
