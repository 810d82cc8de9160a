"""The paper's whole pipeline on the toy task, on CPU, in about 4 minutes: SFT -> sampling -> true rewards ->
reward model -> annotation -> RAO and six baselines, each with the hyperparameters the toy study chose on
validation prompts (configs/toy/pipeline.yaml) -> greedy answers to validation and test prompts scored by the
task's true reward. One seed: for intervals over seeds, the ablations and the Fig. 2 sweeps, run the study
(scripts/toy_study.py). Everything lands in one folder (study.md, PNG figures, each stage's logs).

    python scripts/toy_pipeline.py --out runs/toy

See rao_tune/toy/pipeline.py for the stages; each runs one of our recipes with a config of configs/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rao_tune.toy.study import load_study_config, run_study  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy" / "pipeline.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/toy"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    run_study(load_study_config(CONFIG, [f"out={args.out}", f"seeds=[{args.seed}]"]))
    print("\n" + (args.out / "study.md").read_text())
    print(f"total: {time.perf_counter() - started:.0f} s; outputs in {args.out}/")


if __name__ == "__main__":
    main()
