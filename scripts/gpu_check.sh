#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py), in two steps:
#
#   bash scripts/gpu_check.sh download   # here, with the package registry: the wheels the GPU machine lacks -> .whl/
#   bash scripts/gpu_check.sh            # on the GPU machine: install .whl/ into /tmp/site, run the check
#   bash scripts/gpu_check.sh --small    # the same install and script in its CPU mode (arguments go to gpu_check.py):
#                                        # a rehearsal on a CPU machine with the GPU machine's packages
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), pandas, pyarrow, tokenizers, safetensors, sentencepiece,
# tiktoken and transformers, and no network. It lacks torchtune, torchao, omegaconf, datasets (which torchtune
# imports) and datasets' dill and multiprocess, and torchdata: about 10 MB of wheels, carried in .whl/ (ignored by
# git; the device tool's `carry`). xxhash (datasets) and psutil (torchtune.training) are carried too: an environment
# with exactly the packages listed above (torch 2.11 + transformers 5.17 on CPU) failed to import without them.
# The figures go to stdout and to ${OUT:-.}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        torchdata==0.11.0 xxhash==4.1.0 psutil==7.2.2)

if [[ "${1:-}" == "download" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  du -sh .whl
  exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
# H100 SXM dense bf16 peak for the useful-MFU column; another card: set PEAK_TFLOPS.
timeout "${GPU_CHECK_TIMEOUT:-540}" python3 scripts/gpu_check.py --peak-tflops "${PEAK_TFLOPS:-989}" \
  --layers "${LAYERS:-4}" --out "${OUT:-.}/gpu_check.json" "$@"
