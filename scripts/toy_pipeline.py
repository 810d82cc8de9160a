"""The paper's whole pipeline on a toy task, on CPU, in a few minutes: SFT -> sampling -> true rewards -> reward
model -> annotation -> RAO, DPO, IPO, SimPO and reward distillation -> greedy answers scored by the true reward,
plus the log Z_0 sweep of the paper's Fig. 2. Everything lands in one folder (summary.md, PNG plots, each stage's
logs and checkpoints).

    python scripts/toy_pipeline.py --out runs/toy

See rao_tune/pipeline.py for the stages; each runs one of our recipes with a config of configs/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rao_tune.pipeline import run_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/toy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink data and budgets (tests use 0.05)")
    args = parser.parse_args()
    started = time.perf_counter()
    run_pipeline(args.out, seed=args.seed, scale=args.scale)
    print("\n" + (args.out / "summary.md").read_text())
    print(f"total: {time.perf_counter() - started:.0f} s; outputs in {args.out}/")


if __name__ == "__main__":
    main()
