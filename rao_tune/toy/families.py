"""Tiny, hub-free assets for every model family we support: Llama 3, Qwen2.5 and EuroLLM.

Same spirit as :mod:`rao_tune.toy.assets` (which holds the Llama 3 pieces): tokenizers trained in well under a second
on :func:`rao_tune.toy.task.tiny_corpus`, randomly initialised two-layer checkpoints in Hugging Face format,
deterministic for a seed, nothing downloaded. :func:`build_family_assets` returns what a config needs to
instantiate each family's tokenizer, model and checkpointer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

import sentencepiece
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS

from rao_tune.models.eurollm import IM_END, IM_START
from rao_tune.toy.assets import (
    CHECKPOINT_FILE,
    build_llama3_checkpoint,
    build_qwen2_checkpoint,
    build_tiny_assets,
    write_special_tokens,
)
from rao_tune.toy.task import tiny_corpus

FAMILIES: tuple[str, ...] = ("llama3", "qwen2_5", "eurollm")

EUROLLM_TOKENIZER_FILE = "tokenizer.model"
QWEN2_VOCAB_FILE = "vocab.json"
QWEN2_MERGES_FILE = "merges.txt"

# --- EuroLLM --------------------------------------------------------------------------------------------------


def build_eurollm_tokenizer(
    out_dir: Path, corpus: list[str], vocab_size: int = 512, *, add_dummy_prefix: bool = False
) -> dict[str, Any]:
    """Train a tiny EuroLLM-style SentencePiece BPE on ``corpus`` and write it to ``out_dir/tokenizer.model``.

    EuroLLM's special ids: unk 0, ``<s>`` 1, ``</s>`` 2 (also the pad: the model defines no pad piece),
    ``<|im_start|>`` 3 and ``<|im_end|>`` 4 as user-defined symbols (one token wherever they appear in text),
    byte fallback (``\\n`` and any character outside the corpus encode as bytes), digits split, no
    normalisation. ``add_dummy_prefix`` only serves to test that the tokenizer turns a dummy prefix off.
    Returns the path and the vocabulary size (``vocab_size`` unless the corpus cannot fill it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=[IM_START, IM_END],
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    tokenizer_path = out_dir / EUROLLM_TOKENIZER_FILE
    tokenizer_path.write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    return {
        "tokenizer_path": tokenizer_path,
        "vocab_size": processor.vocab_size(),
        "special_tokens": {piece: processor.piece_to_id(piece) for piece in ("<unk>", "<s>", "</s>", IM_START, IM_END)},
    }


def build_eurollm_checkpoint(
    out_dir: Path,
    vocab_size: int,
    *,
    seed: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: Optional[int] = 2,
    **shape: int,
) -> dict[str, Any]:
    """A random tiny EuroLLM as a Hugging Face ``LlamaForCausalLM`` checkpoint in ``out_dir`` (rope_theta
    10000, untied, EuroLLM's bos / eos / pad ids in ``config.json``). Returns the
    :func:`rao_tune.models.eurollm` kwargs that rebuild it."""
    model_kwargs = build_llama3_checkpoint(
        out_dir, vocab_size, rope_base=10000.0, norm_eps=1e-5, seed=seed, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, **shape,
    )
    if pad_token_id is not None:
        _update_config(out_dir, pad_token_id=pad_token_id)
    return model_kwargs


# --- Qwen2.5 --------------------------------------------------------------------------------------------------


def build_qwen2_tokenizer(out_dir: Path, corpus: list[str], base_vocab_size: int = 512) -> dict[str, Any]:
    """Train a tiny byte-level BPE on ``corpus`` and write it as Qwen2.5's ``vocab.json`` + ``merges.txt``, with
    Qwen2.5's special tokens (in their order) at ids ``base_vocab_size`` and up, listed in a Hugging Face
    ``tokenizer.json``-style ``special_tokens.json``.

    Load it with ``torchtune.models.qwen2_5.qwen2_5_tokenizer(path, merges_file,
    special_tokens_path=special_tokens_path)``. As in :func:`rao_tune.toy.assets.build_tokenizer`, ids below
    ``base_vocab_size`` the corpus leaves unused, and ids after the named special tokens up to a multiple of
    16, are reserved special tokens, so every id of the model's vocabulary (``vocab_size``) decodes.
    """
    if base_vocab_size < 256:
        raise ValueError(f"base_vocab_size must hold the 256 single bytes, got {base_vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    # Split as Qwen2Tokenizer does at encode time, so no merge crosses its pre-tokenized pieces.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = trained["vocab"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in trained["merges"]]
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > base_vocab_size:
        raise RuntimeError(f"unexpected BPE vocabulary: {len(vocab)} ids for base_vocab_size {base_vocab_size}")

    vocab_path = out_dir / QWEN2_VOCAB_FILE
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merges_path = out_dir / QWEN2_MERGES_FILE
    merges_path.write_text("#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges), encoding="utf-8")

    named = sorted(QWEN2_5_SPECIAL_TOKENS, key=QWEN2_5_SPECIAL_TOKENS.__getitem__)
    special_tokens, vocab_size, special_tokens_path = write_special_tokens(
        out_dir, named, num_merged=len(vocab), base_vocab_size=base_vocab_size
    )
    return {
        "vocab_path": vocab_path,
        "merges_path": merges_path,
        "special_tokens_path": special_tokens_path,
        "vocab_size": vocab_size,
        "base_vocab_size": base_vocab_size,
        "special_tokens": special_tokens,
    }


# --- All families ---------------------------------------------------------------------------------------------


def build_family_assets(out_dir: Path, family: str, seed: int = 0) -> dict[str, Any]:
    """Tokenizer and matching random checkpoint of ``family`` (``llama3``, ``qwen2_5`` or ``eurollm``) under
    ``out_dir``. Returns:

    - ``tokenizer_component`` / ``tokenizer_kwargs``: ``{"_component_": ..., **kwargs}`` instantiates it;
    - ``model_component`` / ``model_kwargs``: the decoder builder and its kwargs (also the ``decoder`` and
      kwargs of :func:`rao_tune.models.reward_model`);
    - ``checkpoint_dir``, ``checkpoint_files``, ``model_type`` (``LLAMA3`` for Llama 3 and EuroLLM, ``QWEN2``):
      for ``FullModelHFCheckpointer`` and ``RewardModelHFCheckpointer``;
    - ``vocab_size``, ``pad_id``, ``special_tokens`` (name -> id);
    - ``first_token`` / ``first_token_id``: t0, the token every tokenized conversation starts with
      (``<|begin_of_text|>``, ``<|im_start|>``, ``<s>``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "model"
    if family == "llama3":
        tiny = build_tiny_assets(out_dir, seed=seed)  # the tiny config's own assets
        special_tokens = tiny["special_tokens"]
        return {
            "family": family,
            "out_dir": out_dir,
            "tokenizer_component": "torchtune.models.llama3.llama3_tokenizer",
            "tokenizer_kwargs": {
                "path": str(tiny["tokenizer_path"]),
                "special_tokens_path": str(tiny["special_tokens_path"]),
            },
            "model_component": "torchtune.models.llama3.llama3",
            "model_kwargs": tiny["model_kwargs"],
            "checkpoint_dir": tiny["checkpoint_dir"],
            "checkpoint_files": list(tiny["checkpoint_files"]),
            "model_type": "LLAMA3",
            "vocab_size": tiny["vocab_size"],
            "pad_id": special_tokens["<|finetune_right_pad_id|>"],
            "special_tokens": special_tokens,
            "first_token": "<|begin_of_text|>",
            "first_token_id": special_tokens["<|begin_of_text|>"],
        }
    corpus = tiny_corpus(seed)
    if family == "qwen2_5":
        tokenizer = build_qwen2_tokenizer(out_dir / "tokenizer", corpus)
        special_tokens = tokenizer["special_tokens"]
        model_kwargs = build_qwen2_checkpoint(checkpoint_dir, tokenizer["vocab_size"], seed=seed)
        # Qwen2.5's config names its end of text as bos and the end of turn as eos; transformers needs neither.
        _update_config(checkpoint_dir, bos_token_id=special_tokens["<|endoftext|>"],
                       eos_token_id=special_tokens["<|im_end|>"])
        return {
            "family": family,
            "out_dir": out_dir,
            "tokenizer_component": "torchtune.models.qwen2_5.qwen2_5_tokenizer",
            "tokenizer_kwargs": {
                "path": str(tokenizer["vocab_path"]),
                "merges_file": str(tokenizer["merges_path"]),
                "special_tokens_path": str(tokenizer["special_tokens_path"]),
            },
            "model_component": "torchtune.models.qwen2.qwen2",
            "model_kwargs": model_kwargs,
            "checkpoint_dir": checkpoint_dir,
            "checkpoint_files": [CHECKPOINT_FILE],
            "model_type": "QWEN2",
            "vocab_size": tokenizer["vocab_size"],
            "pad_id": special_tokens["<|endoftext|>"],
            "special_tokens": special_tokens,
            "first_token": "<|im_start|>",
            "first_token_id": special_tokens["<|im_start|>"],
        }
    tokenizer = build_eurollm_tokenizer(out_dir / "tokenizer", corpus)
    special_tokens = tokenizer["special_tokens"]
    model_kwargs = build_eurollm_checkpoint(
        checkpoint_dir,
        tokenizer["vocab_size"],
        seed=seed,
        bos_token_id=special_tokens["<s>"],
        eos_token_id=special_tokens["</s>"],
        pad_token_id=special_tokens["</s>"],
    )
    return {
        "family": family,
        "out_dir": out_dir,
        "tokenizer_component": "rao_tune.models.eurollm_tokenizer",
        "tokenizer_kwargs": {"path": str(tokenizer["tokenizer_path"])},
        "model_component": "rao_tune.models.eurollm",
        "model_kwargs": model_kwargs,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_files": [CHECKPOINT_FILE],
        "model_type": "LLAMA3",
        "vocab_size": tokenizer["vocab_size"],
        "pad_id": special_tokens["</s>"],
        "special_tokens": special_tokens,
        "first_token": "<s>",
        "first_token_id": special_tokens["<s>"],
    }


def _update_config(checkpoint_dir: Path, **fields: Any) -> None:
    config_path = Path(checkpoint_dir) / "config.json"
    config = json.loads(config_path.read_text())
    config.update(fields)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
