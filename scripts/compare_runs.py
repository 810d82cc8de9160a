"""Compare training runs of different losses side by side, from the metrics each run logged.

    python scripts/compare_runs.py runs/tiny_rao runs/tiny_dpo runs/tiny_simpo --last 16

For every run (an ``output_dir``: its ``metrics.jsonl``, whatever metric logger it used, or the DiskLogger files in
``logs/`` of a run without one): the mean over its last ``--last`` steps of the metrics every loss logs the same
way (step 1's loss too), as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rao_tune.training.metrics import read_metrics  # noqa: E402

COLUMNS = ("logratio_best", "logratio_worst", "implicit_accuracy", "reward_correlation", "loss")


def summarise(run_dir: Path, last: int) -> dict[str, float]:
    steps = {step: metrics for step, metrics in read_metrics(run_dir).items() if "loss" in metrics}
    tail = [steps[step] for step in sorted(steps)[-last:]]
    summary = {"steps": float(len(steps)), "first_loss": steps[min(steps)]["loss"]}
    for column in COLUMNS:
        values = [metrics[column] for metrics in tail if column in metrics]
        summary[column] = statistics.fmean(values) if values else float("nan")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--last", type=int, default=16, help="steps averaged at the end of each run")
    args = parser.parse_args()
    header = ["run", "steps", "first loss", *(f"{c} (last {args.last})" for c in COLUMNS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in args.runs:
        summary = summarise(run, args.last)
        cells = [run.name, f"{summary['steps']:.0f}", f"{summary['first_loss']:.4g}"]
        cells += [f"{summary[c]:.3g}" for c in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
