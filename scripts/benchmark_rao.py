"""Step time, throughput and peak memory of a training recipe on a given config.

Runs the recipe through ``tune run`` exactly as a user would, into a scratch output directory, then summarises the
metrics it logged (its ``metrics.jsonl``; a torchtune recipe's DiskLogger files in ``logs/``). The first
``--warmup`` steps (allocator growth, lazy init) are left out of the timings.

    python scripts/benchmark_rao.py --config configs/tiny_rao.yaml --nproc 1
    python scripts/benchmark_rao.py --config configs/tiny_rao.yaml --nproc 2 -- epochs=1 batch_size=8

The tiny config needs its assets first: ``python scripts/build_tiny_assets.py --out assets/tiny``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rao_tune.training.metrics import read_metrics  # noqa: E402

MEMORY_METRICS = ("peak_rss", "peak_memory_active", "peak_memory_alloc", "peak_memory_reserved")


def summarise(steps: dict[int, dict[str, float]], warmup: int) -> dict[str, float]:
    steps = {step: metrics for step, metrics in steps.items() if "step_time" in metrics}  # not calibration lines
    timed = [metrics for step, metrics in sorted(steps.items()) if step > warmup] or list(steps.values())
    step_times = [metrics["step_time"] for metrics in timed]
    summary = {
        "steps": len(steps),
        "timed_steps": len(timed),
        "step_time_median_s": statistics.median(step_times),
        "step_time_mean_s": statistics.fmean(step_times),
        "tokens_per_second_median": statistics.median(metrics["tokens_per_second"] for metrics in timed),
        "first_loss": steps[min(steps)]["loss"],
        "last_loss": steps[max(steps)]["loss"],
    }
    for name in MEMORY_METRICS:
        values = [metrics[name] for metrics in steps.values() if name in metrics]
        if values:
            summary[f"{name}_gib"] = max(values)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/rao_distributed.py")
    parser.add_argument("--config", default="configs/tiny_rao.yaml")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timings")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, after --")
    args = parser.parse_args()

    summary = run_once(args.recipe, args.config, args.nproc, args.overrides, warmup=args.warmup)
    print(json.dumps(summary, indent=2))


def run_once(recipe: str, config: str, nproc: int, overrides: list[str], *, warmup: int) -> dict[str, Any]:
    """One ``tune run`` of ``recipe`` into a scratch folder; the summary of what it logged, with its wall time."""
    with tempfile.TemporaryDirectory(prefix="rao_bench_") as scratch:
        command = [
            sys.executable, "-m", "torchtune._cli.tune", "run", "--nproc_per_node", str(nproc),
            recipe, "--config", config, f"output_dir={scratch}", *overrides,
        ]
        print(" ".join(command), file=sys.stderr)
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO_ROOT, check=True)
        wall = time.perf_counter() - started
        summary = summarise(read_metrics(scratch), warmup)
        checkpoints = sorted((Path(scratch) / "checkpoints").glob("step_*"))
        if checkpoints:
            summary["step_checkpoint_mib"] = sum(f.stat().st_size for f in checkpoints[-1].iterdir()) / 2**20
    summary.update(wall_time_s=wall, nproc=nproc, config=config, overrides=" ".join(overrides))
    return summary


if __name__ == "__main__":
    main()
