"""Step-checkpoint cost, ours against torchtune's: save time, size on disk and resume (load) time of model +
optimizer + schedule state for a sharded (FSDP2) llama3-shaped model with AdamW state.

    python scripts/benchmark_checkpoint.py --dim 1024 --layers 8 --vocab 128256 --rounds 3
    torchrun --nproc_per_node 2 scripts/benchmark_checkpoint.py --dim 1024 --layers 8 --vocab 128256

Modes, interleaved round by round in one process group, medians reported:
- ``ours``: ``rao_tune.training.checkpoint.StepCheckpointer`` (each process writes its own DCP shards into a
  ``.partial`` folder, fsync, rename): "save" is the time training is blocked, here until the files are on disk.
- ``ours_async``: the same with ``dcp.async_save``; "save" is the time training is blocked (the staging copy),
  "commit" the time until the checkpoint is on disk.
- ``torchtune``: what torchtune 0.6.1's full-finetune recipes do at an intermediate checkpoint: gather the full
  model and optimizer state on rank 0 (``gather_cpu_state_dict``, ``get_full_optimizer_state_dict``) and write
  them with ``FullModelHFCheckpointer.save_checkpoint(intermediate_checkpoint=True)`` (safetensors +
  ``recipe_state.pt``); it does not fsync, so "on disk" adds an fsync of its files for a like-for-like figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchtune import training
from torchtune.models import convert_weights
from torchtune.models.llama3 import llama3
from safetensors.torch import load_file, save_file

from rao_tune.files import fsync_tree
from rao_tune.training.checkpoint import Progress, StepCheckpointer, complete_checkpoints
from rao_tune.training.distributed import init_distributed
from rao_tune.training.model import setup_fsdp_model


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="ours,ours_async,torchtune")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    device = torch.device("cpu")
    world_size, rank = init_distributed(device)
    model_kwargs = dict(vocab_size=args.vocab, num_layers=args.layers, num_heads=args.dim // 64,
                        num_kv_heads=max(1, args.dim // 256), embed_dim=args.dim, intermediate_dim=int(3.5 * args.dim),
                        max_seq_len=1024, rope_base=500000.0, norm_eps=1e-5)
    cfg_model = OmegaConf.create({"_component_": "torchtune.models.llama3.llama3", **model_kwargs})
    torch.manual_seed(0)
    full_state = llama3(**model_kwargs).state_dict()
    model = setup_fsdp_model(cfg_model, full_state, device=device, dtype=torch.float32)
    del full_state
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    lr_scheduler = training.lr_schedulers.get_cosine_schedule_with_warmup(optimizer, 10, 100)
    model(torch.randint(0, args.vocab, (1, 16))).sum().backward()  # creates the AdamW state
    optimizer.step()
    optimizer.zero_grad()

    root = Path(args.dir or tempfile.mkdtemp(prefix="rao_tune_ckpt_bench_")) if rank == 0 else None
    shared = [str(root) if root else None]
    dist.broadcast_object_list(shared, src=0)
    root = Path(shared[0])

    # torchtune's checkpointer needs an HF checkpoint to learn its layout from: the same model, written once.
    hf_dir = root / "hf"
    if rank == 0:
        hf_dir.mkdir(parents=True, exist_ok=True)
        state = training.gather_cpu_state_dict(model, True, device=device)
        save_file({k: v.contiguous() for k, v in convert_weights.tune_to_hf(
            state, num_heads=model_kwargs["num_heads"], num_kv_heads=model_kwargs["num_kv_heads"],
            dim=args.dim).items()}, hf_dir / "model.safetensors")
        (hf_dir / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": args.dim,
            "num_attention_heads": model_kwargs["num_heads"], "num_key_value_heads": model_kwargs["num_kv_heads"],
            "num_hidden_layers": args.layers, "vocab_size": args.vocab}))
    else:
        training.gather_cpu_state_dict(model, False, device=device)
    dist.barrier()
    torchtune_checkpointer = None
    if rank == 0 and "torchtune" in args.modes:  # it learns the file layout from a load, as in its recipes
        torchtune_checkpointer = training.FullModelHFCheckpointer(
            checkpoint_dir=str(hf_dir), checkpoint_files=["model.safetensors"], model_type="LLAMA3",
            output_dir=str(root / "torchtune"))
        torchtune_checkpointer.load_checkpoint()

    times: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, int] = {}
    modes = args.modes.split(",")
    for round_index in range(args.rounds):
        for mode in modes[round_index % len(modes):] + modes[: round_index % len(modes)]:
            out = root / mode
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
            dist.barrier()
            record = times.setdefault(mode, {"save": [], "commit": [], "load": []})
            if mode.startswith("ours"):
                checkpointer = StepCheckpointer(out, keep_last_n=None, async_save=mode == "ours_async", rank=rank)
                started = time.perf_counter()
                checkpointer.save(model, optimizer, lr_scheduler, Progress(0, 1, 1), {})
                dist.barrier()
                record["save"].append(time.perf_counter() - started)
                checkpointer.finish()
                record["commit"].append(time.perf_counter() - started)
                (path,) = complete_checkpoints(out)
                started = time.perf_counter()
                checkpointer.load(path, model, optimizer, lr_scheduler)
                dist.barrier()
                record["load"].append(time.perf_counter() - started)
            else:
                started = time.perf_counter()
                model_state = training.gather_cpu_state_dict(model, rank == 0, device=device)
                optimizer_state = training.get_full_optimizer_state_dict(model, optimizer, rank == 0, device=device)
                if rank == 0:
                    torchtune_checkpointer.save_checkpoint({training.MODEL_KEY: model_state, training.OPT_KEY: optimizer_state,
                                                  "lr_scheduler": lr_scheduler.state_dict()}, epoch=0,
                                                 intermediate_checkpoint=True)
                dist.barrier()
                record["save"].append(time.perf_counter() - started)
                if rank == 0:  # torchtune does not fsync: its files may still be in the page cache
                    fsync_tree(out)
                dist.barrier()
                record["commit"].append(time.perf_counter() - started)
                # torchtune's resume: every rank reads the full state (weights converted back from HF names), as
                # its recipes call load_checkpoint on every rank, and loads its shard of it.
                started = time.perf_counter()
                (weights,) = (out / "epoch_0").glob("*.safetensors")
                loaded = {training.MODEL_KEY: convert_weights.hf_to_tune(
                    load_file(weights), num_heads=model_kwargs["num_heads"],
                    num_kv_heads=model_kwargs["num_kv_heads"], dim=args.dim),
                    **torch.load(out / "recipe_state" / "recipe_state.pt", weights_only=True)}
                training.load_from_full_model_state_dict(model, loaded[training.MODEL_KEY], device, strict=True)
                # torchtune's model loader assigns new parameters: a resumed run builds its optimizer after it.
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
                training.load_from_full_optimizer_state_dict(model, optimizer, loaded[training.OPT_KEY], device)
                lr_scheduler = training.lr_schedulers.get_cosine_schedule_with_warmup(optimizer, 10, 100)
                lr_scheduler.load_state_dict(loaded["lr_scheduler"])
                dist.barrier()
                record["load"].append(time.perf_counter() - started)
                del model_state, optimizer_state, loaded
            if rank == 0:
                sizes[mode] = folder_size(out)

    if rank == 0:
        print(f"\n{num_params / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, vocab {args.vocab}), "
              f"fp32 + AdamW, {world_size} process(es), {args.rounds} rounds; medians")
        print(f"{'mode':<12} {'size MiB':>9} {'save s':>8} {'on disk s':>10} {'load s':>8}")
        summary = {}
        for mode in modes:
            med = {key: statistics.median(values) for key, values in times[mode].items()}
            summary[mode] = {"size_gib": sizes[mode] / 2**30, **med}
            print(f"{mode:<12} {sizes[mode] / 2**20:>9.1f} {med['save']:>8.2f} {med['commit']:>10.2f} {med['load']:>8.2f}")
        if args.out:
            args.out.write_text(json.dumps({"settings": {**vars(args), "dir": str(args.dir), "out": str(args.out)},
                                            "params": num_params, "world_size": world_size, "modes": summary}, indent=2))
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
