"""Tiny, hub-free assets (tokenizer, Llama3 checkpoint, the toy task's data) so tests and the tiny configs run on a CPU.

Nothing here downloads anything: the tokenizer is trained on a generated corpus, the model is randomly
initialised, and the data is a synthetic task whose rewards grade how right each answer is.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import llama3
from torchtune.models.llama3._tokenizer import CL100K_PATTERN
from torchtune.models.qwen2 import qwen2
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

from rao_tune.eval.judges import build_tiny_eval_prompts
from rao_tune.files import write_jsonl
from rao_tune.toy.task import (
    build_reward_data,
    build_tiny_eval_tasks,
    marker_preference_rows,
    reward_rows,
    sft_rows,
    task_prompts,
    tiny_corpus,
)

# The special tokens torchtune's Llama3Tokenizer looks up, in Llama 3's order. Their ids start at
# ``base_vocab_size`` whatever the corpus, so configs can rely on them.
LLAMA3_NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# The total vocabulary is rounded up to a multiple of this with reserved special tokens.
VOCAB_MULTIPLE = 16

TOKENIZER_FILE = "tokenizer.model"
SPECIAL_TOKENS_FILE = "special_tokens.json"
CHECKPOINT_FILE = "model.safetensors"



def _byte_to_char() -> dict[int, str]:
    """The byte -> printable character table byte-level BPE trains on (GPT-2's): printable Latin-1 bytes map to
    themselves, every other byte to an unused code point from 256 up, so every byte string is a plain string."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def _train_byte_level_bpe(corpus: list[str], base_vocab_size: int) -> list[bytes]:
    """Train a byte-level BPE and return its tokens as bytes in rank order: the 256 single bytes first (so any
    text encodes), then each merge in the order it was learnt (so tiktoken merges in the same order)."""
    tokenizer = Tokenizer(models.BPE())
    # Split like tiktoken will at encode time, so the learnt merges never cross tiktoken's pieces.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]

    char_to_byte = {char: byte for byte, char in _byte_to_char().items()}

    def to_bytes(piece: str) -> bytes:
        return bytes(char_to_byte[char] for char in piece)

    tokens = [bytes([byte]) for byte in range(256)]
    seen = set(tokens)
    for left, right in merges:
        merged = to_bytes(left) + to_bytes(right)
        if merged not in seen:
            seen.add(merged)
            tokens.append(merged)
    return tokens[:base_vocab_size]


def write_special_tokens(
    out_dir: Path, names: Sequence[str], *, num_merged: int, base_vocab_size: int
) -> tuple[dict[str, int], int, Path]:
    """Give the named special tokens the ids after ``base_vocab_size``, fill the unused ids (below
    ``base_vocab_size`` and up to a multiple of ``VOCAB_MULTIPLE``) with reserved tokens, so that the tokenizer's
    vocabulary equals the model's, and write them as a Hugging Face tokenizer.json's "added_tokens" (the layout
    torchtune's parsers read). Returns (name -> id, vocab size, path)."""
    special_tokens = {name: base_vocab_size + offset for offset, name in enumerate(names)}
    named_end = base_vocab_size + len(names)
    vocab_size = -(-named_end // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    reserved_ids = [*range(num_merged, base_vocab_size), *range(named_end, vocab_size)]
    for index, token_id in enumerate(reserved_ids):
        special_tokens[f"<|reserved_special_token_{index}|>"] = token_id
    special_tokens_path = out_dir / SPECIAL_TOKENS_FILE
    added_tokens = [
        {"id": token_id, "content": name, "special": True}
        for name, token_id in sorted(special_tokens.items(), key=lambda item: item[1])
    ]
    special_tokens_path.write_text(json.dumps({"added_tokens": added_tokens}, indent=2) + "\n")
    return special_tokens, vocab_size, special_tokens_path


def build_tokenizer(out_dir: Path, corpus: list[str], base_vocab_size: int = 512) -> dict[str, Any]:
    """Write a tiny Llama3-style tiktoken tokenizer to ``out_dir``, trained on ``corpus``.

    Special tokens take ids ``base_vocab_size`` and up; when the corpus yields fewer merges than the base
    vocabulary has room for, the gap is filled with reserved special tokens, so ids and ``vocab_size`` depend
    only on ``base_vocab_size``. Load it with ``llama3_tokenizer(tokenizer_path,
    special_tokens_path=special_tokens_path)``; the model's vocabulary must equal ``vocab_size``.
    """
    if base_vocab_size < 256:
        raise ValueError(f"base_vocab_size must hold the 256 single bytes, got {base_vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tokens = _train_byte_level_bpe(corpus, base_vocab_size)
    tokenizer_path = out_dir / TOKENIZER_FILE
    tokenizer_path.write_text(
        "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))
    )

    special_tokens, vocab_size, special_tokens_path = write_special_tokens(
        out_dir, LLAMA3_NAMED_SPECIAL_TOKENS, num_merged=len(tokens), base_vocab_size=base_vocab_size
    )

    return {
        "tokenizer_path": tokenizer_path,
        "special_tokens_path": special_tokens_path,
        "vocab_size": vocab_size,
        "base_vocab_size": base_vocab_size,
        "num_merged_tokens": len(tokens),
        "special_tokens": special_tokens,
    }


# The small decoder shape of every tiny family.
TINY_SHAPE: dict[str, int] = {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "intermediate_dim": 128,
    "max_seq_len": 256,
}


def _decoder_kwargs(
    out_dir: Path, vocab_size: int, shape: dict[str, int], *, rope_base: float, norm_eps: float
) -> dict[str, Any]:
    """The builder kwargs of a tiny decoder (:data:`TINY_SHAPE` with ``shape``'s overrides); creates ``out_dir``."""
    unknown = set(shape) - set(TINY_SHAPE)
    if unknown:
        raise TypeError(f"unknown decoder shape arguments: {sorted(unknown)}")
    kwargs: dict[str, Any] = {"vocab_size": vocab_size, **TINY_SHAPE, **shape, "rope_base": rope_base, "norm_eps": norm_eps}
    if kwargs["embed_dim"] % kwargs["num_heads"] != 0:
        raise ValueError(f"embed_dim {kwargs['embed_dim']} is not a multiple of num_heads {kwargs['num_heads']}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return kwargs


def _hf_config(model_kwargs: dict[str, Any], **family_fields: Any) -> dict[str, Any]:
    """``config.json`` of a torchtune decoder built from ``model_kwargs``: the shared shape fields, then the
    family's own (architectures, model_type, ...)."""
    return {
        "hidden_size": model_kwargs["embed_dim"],
        "intermediate_size": model_kwargs["intermediate_dim"],
        "num_hidden_layers": model_kwargs["num_layers"],
        "num_attention_heads": model_kwargs["num_heads"],
        "num_key_value_heads": model_kwargs["num_kv_heads"],
        "vocab_size": model_kwargs["vocab_size"],
        "max_position_embeddings": model_kwargs["max_seq_len"],
        "rope_theta": model_kwargs["rope_base"],
        "rms_norm_eps": model_kwargs["norm_eps"],
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **family_fields,
    }


def _save_hf_weights(out_dir: Path, hf_state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    save_file({name: tensor.contiguous() for name, tensor in hf_state_dict.items()}, str(out_dir / CHECKPOINT_FILE))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_llama3_checkpoint(
    out_dir: Path,
    vocab_size: int,
    *,
    rope_base: float = 500000.0,
    norm_eps: float = 1e-5,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    **shape: int,
) -> dict[str, Any]:
    """Write a randomly initialised tiny Llama3 as a Hugging Face checkpoint (``model.safetensors`` and
    ``config.json``) in ``out_dir``, loadable by torchtune's ``FullModelHFCheckpointer(model_type="LLAMA3")`` and
    by ``transformers.LlamaForCausalLM``. Returns the ``torchtune.models.llama3.llama3`` kwargs that rebuild it.

    It uses the plain ``llama3`` rope (no Llama 3.1 scaling), which is what a ``rope_theta`` alone means to
    transformers. ``shape`` overrides entries of :data:`TINY_SHAPE`.
    """
    model_kwargs = _decoder_kwargs(out_dir, vocab_size, shape, rope_base=rope_base, norm_eps=norm_eps)
    num_heads, num_kv_heads, embed_dim = model_kwargs["num_heads"], model_kwargs["num_kv_heads"], model_kwargs["embed_dim"]
    # Fork the RNG so building assets never shifts the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = llama3(**model_kwargs).to(torch.float32)
    hf_state_dict = tune_to_hf(model.state_dict(), num_heads=num_heads, num_kv_heads=num_kv_heads, dim=embed_dim)
    config = _hf_config(
        model_kwargs,
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        head_dim=embed_dim // num_heads,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
    )
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    _save_hf_weights(out_dir, hf_state_dict, config)
    return model_kwargs


def build_qwen2_checkpoint(
    out_dir: Path,
    vocab_size: int,
    *,
    rope_base: float = 1_000_000.0,
    norm_eps: float = 1e-6,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **shape: int,
) -> dict[str, Any]:
    """Write a random tiny Qwen2 / Qwen2.5 (q/k/v biases, optionally tied embeddings) as an HF checkpoint that
    ``transformers.Qwen2ForCausalLM`` and torchtune's ``model_type=QWEN2`` read. Returns the
    ``torchtune.models.qwen2.qwen2`` kwargs that rebuild it. ``shape`` overrides entries of :data:`TINY_SHAPE`."""
    model_kwargs = _decoder_kwargs(out_dir, vocab_size, shape, rope_base=rope_base, norm_eps=norm_eps)
    model_kwargs["tie_word_embeddings"] = tie_word_embeddings
    num_heads, num_kv_heads, embed_dim = model_kwargs["num_heads"], model_kwargs["num_kv_heads"], model_kwargs["embed_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = qwen2(**model_kwargs).to(torch.float32)
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # torchtune zero-initialises biases; random ones test their mapping
                torch.nn.init.normal_(param, std=0.1)
    hf_state_dict = qwen2_tune_to_hf(
        model.state_dict(), num_heads=num_heads, num_kv_heads=num_kv_heads, dim=embed_dim,
        tie_word_embeddings=tie_word_embeddings,
    )
    config = _hf_config(
        model_kwargs,
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
    )
    _save_hf_weights(out_dir, hf_state_dict, config)
    return model_kwargs


def build_tiny_assets(out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Build the tokenizer, matching checkpoint and training data under ``out_dir``.

    Everything is rebuilt on each call, so the same seed always leaves the same files.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer", tiny_corpus(seed))
    special_tokens = tokenizer["special_tokens"]
    checkpoint_dir = out_dir / "model"
    model_kwargs = build_llama3_checkpoint(
        checkpoint_dir,
        tokenizer["vocab_size"],
        seed=seed,
        bos_token_id=special_tokens["<|begin_of_text|>"],
        eos_token_id=[special_tokens["<|end_of_text|>"], special_tokens["<|eot_id|>"]],
    )
    train_data_path = out_dir / "data" / "train.jsonl"
    build_reward_data(train_data_path, num_prompts=64, seed=seed)
    # SFT data: each prompt with its best response, as chat messages (UltraChat's "messages" layout).
    sft_data_path = out_dir / "data" / "sft.jsonl"
    write_jsonl(sft_data_path, sft_rows(reward_rows(64, seed=seed)))
    # Reward-model data: a learnable preference (the marker word), with a held-out split from another seed.
    preference_train_path = out_dir / "data" / "preference_train.jsonl"
    preference_heldout_path = out_dir / "data" / "preference_heldout.jsonl"
    write_jsonl(preference_train_path, marker_preference_rows(256, seed=seed + 1))
    write_jsonl(preference_heldout_path, marker_preference_rows(64, seed=seed + 2))
    write_jsonl(out_dir / "data" / "prompts.jsonl", [{"prompt": prompt} for prompt in task_prompts(32, seed + 4)])
    eval_tasks_dir = build_tiny_eval_tasks(out_dir / "eval" / "tasks", seed=seed + 3)
    build_tiny_eval_prompts(out_dir)  # AlpacaEval and MT-Bench prompt files for the generation config
    return {
        "out_dir": out_dir,
        "tokenizer_path": tokenizer["tokenizer_path"],
        "special_tokens_path": tokenizer["special_tokens_path"],
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_files": [CHECKPOINT_FILE],
        "train_data_path": train_data_path,
        "sft_data_path": sft_data_path,
        "preference_train_path": preference_train_path,
        "preference_heldout_path": preference_heldout_path,
        "eval_tasks_dir": eval_tasks_dir,
        "vocab_size": tokenizer["vocab_size"],
        "special_tokens": special_tokens,
        "model_kwargs": model_kwargs,
    }
