"""The prepared GPU check: every GPU figure the project lacks, from one run on one GPU.

On the GPU machine (Python 3.12, torch 2.11, none of our other dependencies, no network) run
``bash scripts/gpu_check.sh``: it installs the wheels carried in ``.whl/`` and runs this script there. On CPU, in the
small mode CI runs so that it cannot rot: ``python scripts/gpu_check.py --small``.

Sections (each prints its figures; a failing section prints its error and the next one runs):

1. ``packed_attention``: a decoder of SmolLM2-135M's shape (random weights) scores packed, prefix-shared rows
   with our mask as flex attention (a ``BlockMask``, CUDA) and as a dense SDPA mask, against the same sequences
   in plain padded rows: the largest difference of any sequence's log-prob, per path.
2. ``fused_logprobs``: per-sequence log-probs from our fused projection in bf16 (what training uses) and in fp32,
   against a reference from the full fp32 logits of the fp32 model.
3. ``generation``: PPO's and the sampler's decoding core (``decode_batch``) at a batch of 32, tokens/s.
4. ``steps``: ``scripts/benchmark_efficiency.py`` on Llama-3-8B's layer shape cut to ``--layers`` layers (dim 4096,
   32/8 heads, intermediate 14336, vocabulary 128256), k = 2, DPO, in one interleaved invocation per variant:
   torchtune's DPO step, ours (``all``) and our SFT step; variants eager, compiled (per layer), float8
   (torchao, linear layers), QLoRA (rank 16, NF4 base, our step only), and our step per optimizer (AdamW,
   AdamW stepped in backward, torchao's 8-bit AdamW, both) with one profiled step each (time by phase and
   kernel family, training state's sizes). Useful tokens/s, useful MFU (6 x parameters
   FLOPs per useful token over ``--peak-tflops``), peak memory.

Every figure also goes to ``--out`` (JSON). Sections that need CUDA (flex attention, compile, float8) say
"skipped" on CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

SMOLLM2_SHAPE = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
                     intermediate_dim=1536, max_seq_len=4096, rope_base=100000)
LLAMA3_8B_LAYER = dict(vocab=128256, dim=4096, heads=32, kv_heads=8, intermediate=14336)
# The small mode (CPU, CI): shapes that run in seconds; NF4 needs weights whose sizes are multiples of 64 x 256.
SMALL_SHAPE = dict(vocab_size=576, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=512,
                   max_seq_len=4096, rope_base=500000)
SMALL_LAYER = dict(vocab=576, dim=256, heads=4, kv_heads=2, intermediate=512)


def random_decoder(shape: dict, device, dtype, seed: int = 0):
    import torch
    from torchtune import training
    from torchtune.models.llama3 import llama3

    torch.manual_seed(seed)
    with training.set_default_dtype(dtype), device:
        model = llama3(**shape)
    return model.eval()


def preference_samples(vocab: int, k: int, prompts: int, max_tokens: int, seed: int = 0) -> list[dict]:
    from benchmark_efficiency import make_workload

    return make_workload(vocab=vocab, k=k, prompts=prompts, steps=1, max_tokens=max_tokens, seed=seed)[0]


def largest_difference(got, expected) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, expected))


def check_packed_attention(device, shape: dict) -> dict[str, Any]:
    import torch

    from rao_tune.data import collate_packed_batch, collate_reward_batch
    from rao_tune.training import attention
    from rao_tune.training.logprobs import sequence_logps

    model = random_decoder(shape, device, torch.float32)
    samples = preference_samples(shape["vocab_size"], k=3, prompts=2, max_tokens=400)
    to_device = lambda batch: {key: value.to(device) for key, value in batch.items()}  # noqa: E731
    with torch.no_grad():
        padded = sequence_logps(model, to_device(collate_reward_batch(samples)))
        results: dict[str, Any] = {"sequences": len(padded[0])}
        flex_available = attention.flex_attention_on(device)
        for path, use_flex in (("dense_sdpa", False), ("flex_block_mask", True)):
            if use_flex and not flex_available:
                results[path] = "skipped: flex attention needs CUDA with compute capability >= 7.5"
                continue
            batch = to_device(collate_packed_batch(samples, pad_id=0, max_row_tokens=2048, fixed_width=use_flex))
            routed = attention.flex_attention_on
            attention.flex_attention_on = lambda _device, use_flex=use_flex: use_flex  # pick the path
            try:
                packed = sequence_logps(model, batch)
            finally:
                attention.flex_attention_on = routed
            results[path] = {"max_abs_difference_vs_padded": largest_difference(packed, padded)}
    return results


def check_fused_logprobs(device, shape: dict) -> dict[str, Any]:
    import copy

    import torch

    from rao_tune.data import collate_packed_batch
    from rao_tune.training.attention import model_inputs
    from rao_tune.training.logprobs import segment_sums, sequence_logps

    model = random_decoder(shape, device, torch.float32)
    samples = preference_samples(shape["vocab_size"], k=2, prompts=2, max_tokens=600)
    batch = {key: value.to(device) for key, value in collate_packed_batch(samples, pad_id=0, max_row_tokens=2048).items()}
    with torch.no_grad():
        model.set_num_output_chunks(0)
        logits = model(batch["tokens"], **model_inputs(batch)).float()
        token_logps = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])[batch["logit_positions"]]
        reference = segment_sums(token_logps.gather(-1, batch["target_tokens"][:, None]).squeeze(-1), batch)
        del logits, token_logps
        fused_fp32 = sequence_logps(model, batch)
        fused_bf16 = sequence_logps(copy.deepcopy(model).to(torch.bfloat16), batch)
    scale = max(value.abs().max().item() for value in reference)
    return {"largest_sequence_logp": scale,
            "fused_fp32_max_abs_difference": largest_difference(fused_fp32, reference),
            "fused_bf16_max_abs_difference": largest_difference(fused_bf16, reference),
            "fused_bf16_max_relative_difference": largest_difference(fused_bf16, reference) / scale}


def check_generation(device, shape: dict, *, batch_size: int, new_tokens: int) -> dict[str, Any]:
    import random

    import torch

    from rao_tune.eval.generation import decode_batch

    dtype = torch.bfloat16
    model = random_decoder(shape, device, dtype)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, shape["vocab_size"]) for _ in range(rng.randrange(20, 200))]
               for _ in range(batch_size)]

    def decode(tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            decode_batch(model, prompts, max_new_tokens=tokens, pad_id=0, stop_tokens=[2], device=device,
                         dtype=dtype, temperature=1.0, stop_early=False, rng=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    decode(4)  # warm-up: kernels, allocator
    seconds = decode(new_tokens)
    return {"batch": batch_size, "new_tokens": new_tokens, "dtype": "bf16", "decode_seconds": seconds,
            "tokens_per_second": batch_size * new_tokens / seconds}


def check_steps(device, layer: dict, *, layers: int, small: bool, peak_tflops: float | None) -> dict[str, Any]:
    """One benchmark_efficiency.py invocation per variant (its modes interleave inside it)."""
    cuda = device.type == "cuda"
    dtype = "bf16" if cuda or small else "fp32"
    base = ["--vocab", str(layer["vocab"]), "--dim", str(layer["dim"]), "--heads", str(layer["heads"]),
            "--kv-heads", str(layer["kv_heads"]), "--intermediate", str(layer["intermediate"]), "--layers",
            str(layers), "--k", "2", "--loss", "dpo", "--device", device.type, "--dtype", dtype,
            "--activation-checkpointing", "--rounds", "1", "--steps", "1" if small else "3",
            "--warmup", "1" if small else "2", "--max-tokens", "256" if small else "1024"]
    if peak_tflops:
        base += ["--peak-tflops", str(peak_tflops)]
    variants: dict[str, tuple[list[str], list[str]]] = {
        "eager": (["torchtune", "all", "sft_fused"], []),
        "compiled": (["torchtune", "all", "sft_fused"], ["--compile"]),
        "float8": (["all", "sft_fused"], ["--float8"]),
        "qlora": (["all"], ["--lora-rank", "16", "--qlora"]),
        # The memory floor's levers (optimizer_in_bwd, torchao's 8-bit AdamW), one profiled step each.
        "optimizers": (["all"], ["--optimizers", "adamw", "adamw+in_bwd", "adamw8bit", "adamw8bit+in_bwd", "--profile"]),
    }
    needs_cuda = {"compiled": "compile takes minutes per layer on CPU", "float8": "float8 matmuls need CUDA sm89+"}
    results: dict[str, Any] = {}
    for name, (modes, flags) in variants.items():
        if not cuda and name in needs_cuda:
            results[name] = f"skipped: {needs_cuda[name]}"
            continue
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
            out = Path(scratch) / "steps.json"
            command = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_efficiency.py"), *base, *flags,
                       "--modes", *modes, "--out", str(out)]
            started = time.perf_counter()
            finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            if finished.returncode != 0:
                results[name] = f"failed: {finished.stderr[-2000:]}"
                continue
            print(finished.stdout, flush=True)
            results[name] = {**json.loads(out.read_text())["summaries"], "wall_seconds": time.perf_counter() - started}
    failed = [name for name, result in results.items() if isinstance(result, str) and result.startswith("failed")]
    if failed:
        results["error"] = f"variants failed: {', '.join(failed)}"
    return results


def section(name: str, work: Callable[[], dict], results: dict) -> None:
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = work()
    except Exception:  # one failing section must not cost the others' figures (GPU minutes are rare)
        results[name] = {"error": traceback.format_exc(limit=6)}
    results[name]["section_seconds"] = time.perf_counter() - started
    print(json.dumps(results[name], indent=2, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, CI): checks the code, not the figures")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--layers", type=int, default=4, help="Llama-3-8B layers kept for the step benchmark")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--sections", nargs="+", default=["packed_attention", "fused_logprobs", "generation", "steps"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape, layer = (SMALL_SHAPE, SMALL_LAYER) if args.small else (SMOLLM2_SHAPE, LLAMA3_8B_LAYER)
    results: dict[str, Any] = {"environment": {
        "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "small": args.small, "layers": 2 if args.small else args.layers}}
    print(json.dumps(results["environment"]), flush=True)
    checks = {
        "packed_attention": lambda: check_packed_attention(device, shape),
        "fused_logprobs": lambda: check_fused_logprobs(device, shape),
        "generation": lambda: check_generation(device, shape, batch_size=4 if args.small else 32,
                                               new_tokens=8 if args.small else 128),
        "steps": lambda: check_steps(device, layer, layers=2 if args.small else args.layers, small=args.small,
                                     peak_tflops=args.peak_tflops),
    }
    started = time.perf_counter()
    for name in args.sections:
        section(name, checks[name], results)
    results["total_seconds"] = time.perf_counter() - started
    print(f"total {results['total_seconds']:.0f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
    failed = [name for name in args.sections if isinstance(results[name], dict) and "error" in results[name]]
    if failed:
        sys.exit(f"sections failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
