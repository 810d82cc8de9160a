"""Build the tiny tokenizer, checkpoint and reward data that CPU tests and the tiny config use.

    python scripts/build_tiny_assets.py --out assets/tiny [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import rao_tune  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rao_tune.toy.assets import build_tiny_assets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/tiny"), help="folder to build into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the weights and the data")
    args = parser.parse_args(argv)

    assets = build_tiny_assets(args.out, seed=args.seed)
    print(f"tokenizer:      {assets['tokenizer_path']}")
    print(f"special tokens: {assets['special_tokens_path']}")
    print(f"checkpoint:     {assets['checkpoint_dir']} ({', '.join(assets['checkpoint_files'])}, config.json)")
    print(f"train data:     {assets['train_data_path']}")
    print(f"vocab_size:     {assets['vocab_size']}")
    named = {name: token_id for name, token_id in assets["special_tokens"].items() if "reserved" not in name}
    print("special ids:    " + ", ".join(f"{name}={token_id}" for name, token_id in named.items()))
    print("model kwargs:   " + ", ".join(f"{key}={value}" for key, value in assets["model_kwargs"].items()))


if __name__ == "__main__":
    main()
