"""The toy study: methods x hyperparameter grids x seeds, chosen on validation, reported on test with 95% intervals,
plus the RPO ablations and the paper's Fig. 2 sweeps; every stage runs our recipes. Re-running continues a
stopped study (finished runs are skipped). Writes <out>/study.md, study.json and PNG figures.

    python scripts/toy_study.py --config configs/toy/study.yaml [key=value ...]

See rao_tune/toy/study.py for the protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rao_tune.toy.study import load_study_config, run_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/toy/study.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. out=runs/other seeds=[0,1,2,3]")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_study_config(args.config, args.overrides)
    run_study(cfg)
    print("\n" + (Path(cfg.out) / "study.md").read_text())
    print(f"total: {time.perf_counter() - started:.0f} s; outputs in {cfg.out}/")


if __name__ == "__main__":
    main()
