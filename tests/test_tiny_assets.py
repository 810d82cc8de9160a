"""The tiny assets must be usable exactly as real ones are: torchtune's llama3 tokenizer and HF checkpointer,
and transformers, agree with them, and the data has the native reward layout."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torchtune.data import Message
from torchtune.models.llama3 import llama3, llama3_tokenizer
from torchtune.models.llama3._tokenizer import Llama3Tokenizer
from torchtune.training import FullModelHFCheckpointer

from rao_tune.toy.assets import build_tiny_assets, build_tokenizer
from rao_tune.toy.task import build_reward_data, tiny_corpus


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_tiny_assets(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(assets: dict[str, Any]) -> Llama3Tokenizer:
    return llama3_tokenizer(str(assets["tokenizer_path"]), special_tokens_path=str(assets["special_tokens_path"]))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))}


def test_tokenizer_round_trips_data_and_any_text(assets: dict[str, Any], tokenizer: Llama3Tokenizer) -> None:
    rows = _read_rows(assets["train_data_path"])
    texts = [text for row in rows for text in [row["prompt"], *row["responses"]]]
    texts.append("Unseen text: émoji 🙂, tabs\tand\nnew lines <|eot_id|> 12345")
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    # The corpus taught it the task's words: a prompt takes far fewer tokens than bytes.
    prompt = rows[0]["prompt"]
    assert len(tokenizer.encode(prompt, add_bos=False, add_eos=False)) < len(prompt) / 2


def test_llama3_chat_format(assets: dict[str, Any], tokenizer: Llama3Tokenizer) -> None:
    special = assets["special_tokens"]
    messages = [
        Message(role="user", content="count to 3", masked=True),
        Message(role="assistant", content="1 2 3"),
    ]
    tokens, mask = tokenizer.tokenize_messages(messages)
    assert len(tokens) == len(mask)
    assert tokens[0] == special["<|begin_of_text|>"] and tokens[-1] == special["<|end_of_text|>"]
    assert tokens.count(special["<|start_header_id|>"]) == 2
    assert tokens.count(special["<|eot_id|>"]) == 2
    assert tokenizer.decode(tokens, truncate_at_eos=False, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ncount to 3<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n1 2 3<|eot_id|><|end_of_text|>"
    )
    # Only the assistant's turn is trained on (mask True means "no loss here").
    answer_start = [i for i, token in enumerate(tokens) if token == special["<|start_header_id|>"]][1]
    assert all(mask[:answer_start]) and not any(mask[answer_start:-1]) and mask[-1]


def test_every_id_is_within_the_model_vocab(assets: dict[str, Any], tokenizer: Llama3Tokenizer) -> None:
    vocab_size = assets["vocab_size"]
    assert tokenizer.vocab_size == vocab_size == assets["model_kwargs"]["vocab_size"]
    assert tokenizer.base_vocab_size <= min(assets["special_tokens"].values())
    # Ids are exactly 0 .. vocab_size - 1, so every id the model can emit decodes.
    encoding = tokenizer.tt_model.tt_model
    assert encoding.max_token_value == vocab_size - 1
    assert all(encoding.decode_single_token_bytes(token_id) for token_id in range(vocab_size))
    assert sorted(assets["special_tokens"].values()) == list(range(tokenizer.base_vocab_size, vocab_size))
    for name in ("begin_of_text", "end_of_text", "finetune_right_pad_id", "step_id", "start_header_id",
                 "end_header_id", "eom_id", "eot_id", "python_tag", "image"):  # fmt: skip
        assert assets["special_tokens"][f"<|{name}|>"] < vocab_size


def test_checkpoint_loads_in_torchtune_and_matches_transformers(assets: dict[str, Any], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(assets["checkpoint_dir"]),
        checkpoint_files=assets["checkpoint_files"],
        model_type="LLAMA3",
        output_dir=str(tmp_path / "out"),
    )
    tune_model = llama3(**assets["model_kwargs"])
    tune_model.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)
    tune_model.eval()

    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(assets["checkpoint_dir"]))
    hf_model.eval()
    assert hf_model.dtype == torch.float32

    tokens = torch.randint(0, assets["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tune_logits = tune_model(tokens)
        hf_logits = hf_model(input_ids=tokens).logits
    assert tune_logits.shape == (2, 24, assets["vocab_size"])
    torch.testing.assert_close(tune_logits, hf_logits, atol=1e-4, rtol=1e-4)


def test_reward_data_layout(assets: dict[str, Any]) -> None:
    rows = _read_rows(assets["train_data_path"])
    assert len(rows) == 64
    for row in rows:
        assert set(row) == {"prompt", "responses", "rewards"}
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert 2 <= len(row["responses"]) == len(row["rewards"]) <= 4
        assert all(isinstance(response, str) and response for response in row["responses"])
        assert all(isinstance(r, float) and math.isfinite(r) and 0.0 <= r <= 1.0 for r in row["rewards"])
        assert len(set(row["responses"])) == len(row["responses"])
    assert len({len(row["responses"]) for row in rows}) > 1, "response counts should be uneven"
    assert any(len(set(row["rewards"])) == len(row["rewards"]) > 2 for row in rows)


def test_reward_data_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("a.jsonl", "b.jsonl", "c.jsonl")]
    build_reward_data(paths[0], num_prompts=16, responses_per_prompt=(1, 5), seed=3)
    build_reward_data(paths[1], num_prompts=16, responses_per_prompt=(1, 5), seed=3)
    build_reward_data(paths[2], num_prompts=16, responses_per_prompt=(1, 5), seed=4)
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
    assert {len(row["responses"]) for row in _read_rows(paths[0])} <= set(range(1, 6))


def test_tokenizer_and_assets_are_deterministic(assets: dict[str, Any], tmp_path: Path) -> None:
    first = build_tokenizer(tmp_path / "first", tiny_corpus(seed=0))
    second = build_tokenizer(tmp_path / "second", tiny_corpus(seed=0))
    assert first["tokenizer_path"].read_bytes() == second["tokenizer_path"].read_bytes()
    assert first["special_tokens_path"].read_bytes() == second["special_tokens_path"].read_bytes()

    rebuilt = build_tiny_assets(tmp_path / "rebuilt", seed=0)
    # lm-eval task files name their data by absolute path, so they differ by folder and only there.
    task_files = {"eval/tasks/tiny_choice.yaml", "eval/tasks/tiny_answer.yaml"}
    for out_dir in (rebuilt["out_dir"], assets["out_dir"]):
        for name in task_files:
            text = (out_dir / name).read_text()
            assert text.count(str(out_dir.resolve())) == 1

    def digests(out_dir):
        return {name: digest for name, digest in _file_digests(out_dir).items() if name not in task_files}
    assert digests(rebuilt["out_dir"]) == digests(assets["out_dir"])
    before = _file_digests(rebuilt["out_dir"])
    build_tiny_assets(rebuilt["out_dir"], seed=0)  # building again over existing assets changes nothing
    assert _file_digests(rebuilt["out_dir"]) == before
