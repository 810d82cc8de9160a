"""The reward-annotated dataset builder: layouts, tokenization boundaries and bad rows."""

import importlib
import json
import logging
import math

import datasets
import pytest
import torch

from rao_tune.data import RewardAnnotatedDataset, collate_packed_batch, collate_reward_batch, reward_dataset
from rao_tune.training.attention import prefix_sharing_mask


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows):
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def chat_tokens(tokenizer, role_contents, *, generation_prompt=False):
    """Llama3 chat layout built by hand from the tokenizer's pieces, independent of tokenize_messages."""
    tokens = [tokenizer.bos_id]
    for role, content in role_contents:
        tokens += [tokenizer.start_header_id] + tokenizer.encode(role, add_bos=False, add_eos=False)
        tokens += [tokenizer.end_header_id] + tokenizer.encode("\n\n", add_bos=False, add_eos=False)
        tokens += tokenizer.encode(content.strip(), add_bos=False, add_eos=False) + [tokenizer.eot_id]
    if generation_prompt:
        tokens += [tokenizer.start_header_id] + tokenizer.encode("assistant", add_bos=False, add_eos=False)
        tokens += [tokenizer.end_header_id] + tokenizer.encode("\n\n", add_bos=False, add_eos=False)
    return tokens


def response_tokens(tokenizer, text):
    return tokenizer.encode(text.strip(), add_bos=False, add_eos=False) + [tokenizer.eot_id]


def test_native_layout_tokenizes_prompt_and_responses_apart(tmp_path, tokenizer):
    rows = [
        {"prompt": "count to 3", "responses": ["1 2 3", "1 2"], "rewards": [1.0, 0.5]},
        {
            "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: a b"}],
            "responses": [{"role": "assistant", "content": "b a"}, {"role": "assistant", "content": "a b"},
                          {"role": "assistant", "content": "b"}],
            "rewards": [1.0, 0.0, 0.5],
        },
    ]
    dataset = reward_dataset(tokenizer, source="json", data_files=write_jsonl(tmp_path / "d.jsonl", rows))
    assert dataset.layout == "native" and len(dataset) == 2

    first = dataset[0]
    assert first["prompt_tokens"] == chat_tokens(tokenizer, [("user", "count to 3")], generation_prompt=True)
    assert first["response_tokens"] == [response_tokens(tokenizer, "1 2 3"), response_tokens(tokenizer, "1 2")]
    assert first["rewards"] == [1.0, 0.5]

    second = dataset[1]
    assert second["prompt_tokens"] == chat_tokens(
        tokenizer, [("system", "be brief"), ("user", "reverse: a b")], generation_prompt=True
    )
    assert [tokenizer.decode(r) for r in second["response_tokens"]] == ["b a", "a b", "b"]
    assert dataset.first_token == tokenizer.bos_id
    torch.testing.assert_close(dataset.all_rewards(), torch.tensor([1.0, 0.5, 1.0, 0.0, 0.5], dtype=torch.float64))


def test_column_map_and_parquet(tmp_path, tokenizer):
    rows = [{"question": "count to 2", "answers": ["1 2", "1"], "scores": [1.0, 0.5]}]
    dataset = reward_dataset(
        tokenizer,
        source="parquet",
        data_files=write_parquet(tmp_path / "d.parquet", rows),
        column_map={"prompt": "question", "responses": "answers", "rewards": "scores"},
    )
    assert dataset[0]["rewards"] == [1.0, 0.5]
    assert tokenizer.decode(dataset[0]["response_tokens"][0]) == "1 2"


def test_ultrafeedback_binarized_layout(tmp_path, tokenizer):
    prompt = "repeat the word apple 2 times"
    rows = [
        {
            "prompt": prompt,
            "prompt_id": "x",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "apple apple"}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "apple"}],
            "messages": [],
            "score_chosen": 9.0,
            "score_rejected": 4.5,
        }
    ]
    dataset = reward_dataset(tokenizer, source="json", data_files=write_jsonl(tmp_path / "uf.jsonl", rows))
    assert dataset.layout == "ultrafeedback_binarized"
    sample = dataset[0]
    assert sample["prompt_tokens"] == chat_tokens(tokenizer, [("user", prompt)], generation_prompt=True)
    assert sample["response_tokens"] == [response_tokens(tokenizer, "apple apple"), response_tokens(tokenizer, "apple")]
    assert sample["rewards"] == [9.0, 4.5]


def _openbmb_row(instruction, completions):
    return {
        "source": "test",
        "instruction": instruction,
        "models": ["m"] * len(completions),
        "completions": [
            {
                "model": "m",
                "response": text,
                "overall_score": overall,
                "fine-grained_score": fine,
                "annotations": {"helpfulness": {"Rating": rating, "Rationale": "..."}},
            }
            for text, overall, fine, rating in completions
        ],
    }


@pytest.mark.parametrize(
    "score_field, expected", [("overall_score", [7.0, 3.5, 5.0]), ("fine-grained_score", [4.5, 2.0, 3.25]),
                              ("annotations.helpfulness.Rating", [5.0, 2.0, 4.0])]
)
def test_openbmb_ultrafeedback_layout(tmp_path, tokenizer, score_field, expected):
    rows = [_openbmb_row("count to 2", [("1 2", 7.0, 4.5, "5"), ("2 1", 3.5, 2.0, "2"), ("1", 5.0, 3.25, "4")])]
    dataset = reward_dataset(
        tokenizer, source="json", data_files=write_jsonl(tmp_path / "ob.jsonl", rows), score_field=score_field
    )
    assert dataset.layout == "ultrafeedback"
    assert dataset[0]["rewards"] == expected
    assert [tokenizer.decode(r) for r in dataset[0]["response_tokens"]] == ["1 2", "2 1", "1"]


GOOD = {"prompt": "count to 2", "responses": ["1 2", "1"], "rewards": [1.0, 0.5]}

BAD_ROWS = [
    ({"prompt": "count to 2", "responses": ["1 2", "1"], "rewards": [1.0, None]}, "rewards[1]", "missing"),
    ({"prompt": "count to 2", "responses": ["1 2", "1"], "rewards": [1.0, math.nan]}, "rewards[1]", "not finite"),
    ({"prompt": "count to 2", "responses": ["1 2", "1"], "rewards": [math.inf, 0.0]}, "rewards[0]", "not finite"),
    ({"prompt": "count to 2", "responses": ["1 2", "1"], "rewards": [1.0]}, "rewards", "2 responses but 1 rewards"),
    ({"prompt": "count to 2", "responses": ["1 2", "  "], "rewards": [1.0, 0.0]}, "responses[1]", "empty"),
    ({"prompt": "count to 2", "responses": [], "rewards": []}, "responses", "no responses"),
    ({"prompt": None, "responses": ["1"], "rewards": [1.0]}, "prompt", "missing field"),
    ({"prompt": "count to 2 " * 40, "responses": ["1"], "rewards": [1.0]}, "prompt", "max_seq_len"),
]


@pytest.mark.parametrize("bad_row, field, message", BAD_ROWS)
def test_bad_row_error_names_file_row_and_field(tmp_path, tokenizer, bad_row, field, message):
    # Parquet stores NaN / inf and nulls faithfully; the bad row is third.
    path = write_parquet(tmp_path / "bad.parquet", [GOOD, GOOD, bad_row, GOOD])
    with pytest.raises(ValueError) as err:
        reward_dataset(tokenizer, source="parquet", data_files=path, max_seq_len=64)
    text = str(err.value)
    assert "bad.parquet" in text and "row 2" in text and f"field '{field}'" in text and message in text


def test_drop_mode_skips_bad_rows_and_logs_why(tmp_path, tokenizer, caplog):
    rows = [GOOD] + [row for row, _, _ in BAD_ROWS] + [GOOD]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with caplog.at_level(logging.WARNING):
        dataset = reward_dataset(tokenizer, source="parquet", data_files=path, max_seq_len=64, on_bad_row="drop")
    assert len(dataset) == 2
    assert sum(dataset.dropped.values()) == len(BAD_ROWS)
    assert dataset.dropped["non_finite_reward"] == 2 and dataset.dropped["prompt_too_long"] == 1
    assert f"dropped {len(BAD_ROWS)} bad rows" in caplog.text


class PlainTextTokenizer:
    """A completion-style tokenizer with no BOS and no chat header: the first token is the prompt's first word."""

    def __init__(self, inner):
        self.inner, self.pad_id = inner, inner.pad_id

    def tokenize_messages(self, messages, *, add_end_tokens=True):
        tokens, mask = [], []
        for message in messages:
            piece = self.inner.encode(message.text_content, add_bos=False, add_eos=False)
            tokens, mask = tokens + piece, mask + [message.masked] * len(piece)
        if add_end_tokens:
            tokens, mask = tokens + [self.inner.eos_id], mask + [False]
        return tokens, mask


def test_sequences_must_share_the_first_token(tmp_path, tokenizer):
    rows = [GOOD, {"prompt": "reverse: a b", "responses": ["b a"], "rewards": [1.0]}]
    path = write_jsonl(tmp_path / "t0.jsonl", rows)
    plain = PlainTextTokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"t0\.jsonl, line 2, field 'prompt'.*shared first token t0"):
        RewardAnnotatedDataset(plain, source="json", data_files=path)
    dropped = RewardAnnotatedDataset(plain, source="json", data_files=path, on_bad_row="drop")
    assert len(dropped) == 1 and dropped.dropped == {"first_token": 1}


def test_long_responses_are_cut_to_max_seq_len(tmp_path, tokenizer):
    rows = [{"prompt": "count to 30", "responses": [" ".join(str(i) for i in range(1, 31)), "1"], "rewards": [1.0, 0.0]}]
    dataset = reward_dataset(tokenizer, source="json", data_files=write_jsonl(tmp_path / "l.jsonl", rows), max_seq_len=24)
    sample = dataset[0]
    assert len(sample["prompt_tokens"]) + len(sample["response_tokens"][0]) == 24
    assert len(sample["response_tokens"][1]) == 2  # "1" and <|eot_id|>


def test_unknown_layout_is_explained(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        reward_dataset(tokenizer, source="json", data_files=path)


def test_file_loader_without_files_is_refused(tmp_path, tokenizer, monkeypatch):
    # datasets would otherwise read any json in the working directory as training data.
    write_jsonl(tmp_path / "stray.jsonl", [{"prompt": "p", "responses": ["r"], "rewards": [1.0]}])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="set data_files"):
        reward_dataset(tokenizer, source="json")


COLLATE_SAMPLES = [
    {"prompt_tokens": [5, 6, 7], "response_tokens": [[8, 9], [10]], "rewards": [1.0, 0.0]},
    {"prompt_tokens": [5, 11], "response_tokens": [[12, 13, 14]], "rewards": [0.5]},
]


def test_padded_collate_flattens_uneven_prompts_and_lists_scored_tokens():
    batch = collate_reward_batch(COLLATE_SAMPLES, pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, 0], [5, 11, 12, 13, 14]]
    # Flat position (row * 5 + column) predicting each target; segments: responses 0..2, prompts 3 + b.
    # A prompt's own tokens are scored once, in its first response's row.
    assert batch["logit_positions"].tolist() == [0, 1, 2, 3, 7, 10, 11, 12, 13]
    assert batch["target_tokens"].tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert batch["target_segments"].tolist() == [3, 3, 0, 0, 1, 4, 2, 2, 2]
    assert batch["last_positions"].tolist() == [4, 8, 14]
    assert batch["prompt_ids"].tolist() == [0, 0, 1]
    assert batch["response_lengths"].tolist() == [2, 1, 3]
    assert batch["sequence_lengths"].tolist() == [5, 4, 5]
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.5]
    assert int(batch["useful_tokens"]) == 11
    assert "segment_ids" not in batch  # plain causal attention


def test_packed_collate_shares_each_prompt_and_isolates_responses():
    batch = collate_packed_batch(COLLATE_SAMPLES, pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 10, 5, 11, 12, 13, 14]]
    assert batch["input_pos"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]]  # responses continue the prompt
    assert batch["group_ids"].tolist() == [[0] * 6 + [1] * 5]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 3, 3, 3]]
    # The prompt's last position (2) predicts the first token of both of its responses.
    assert batch["logit_positions"].tolist() == [0, 1, 2, 3, 2, 6, 7, 8, 9]
    assert batch["target_tokens"].tolist() == [6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert batch["target_segments"].tolist() == [3, 3, 0, 0, 1, 4, 2, 2, 2]
    assert batch["last_positions"].tolist() == [4, 5, 10]
    assert int(batch["useful_tokens"]) == batch["tokens"].numel() == 11

    mask = prefix_sharing_mask(batch["group_ids"], batch["segment_ids"])[0]
    visible = {query: mask[query].nonzero().squeeze(-1).tolist() for query in range(11)}
    assert visible[4] == [0, 1, 2, 3, 4]  # response 0: its prompt and itself
    assert visible[5] == [0, 1, 2, 5]  # response 1: its prompt, not its sibling
    assert visible[6] == [6]  # the second prompt starts afresh
    assert visible[10] == [6, 7, 8, 9, 10]


def test_packed_collate_fills_rows_up_to_the_budget_and_pads_only_the_tail():
    batch = collate_packed_batch(COLLATE_SAMPLES, pad_id=0, max_row_tokens=6)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 10], [5, 11, 12, 13, 14, 0]]
    assert batch["group_ids"].tolist() == [[0] * 6, [1] * 5 + [-1]]
    mask = prefix_sharing_mask(batch["group_ids"], batch["segment_ids"])
    assert mask[1, 5].nonzero().squeeze(-1).tolist() == [5]  # padding sees only padding
    assert not mask[1, :5, 5].any()
    with pytest.raises(ValueError, match="does not fit a packed row"):
        collate_packed_batch(COLLATE_SAMPLES, pad_id=0, max_row_tokens=4)
    # fixed-width rows (flex attention on CUDA compiles for one shape): same content, padded to the budget
    fixed = collate_packed_batch(COLLATE_SAMPLES, pad_id=0, max_row_tokens=8, fixed_width=True)
    assert fixed["tokens"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0], [5, 11, 12, 13, 14, 0, 0, 0]]
    assert fixed["last_positions"].tolist() == [4, 5, 8 + 4]


# --- File-level mistakes: one line naming the file and the line ---------------------------------------------------

def test_an_empty_file_is_named(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        reward_dataset(tokenizer, source="json", data_files=str(tmp_path / "empty.jsonl"))


def unreadable_file(tmp_path):
    """A good line, a non-UTF-8 line, malformed JSON, a reward of 1e309 (inf once parsed), a good line."""
    lines = [json.dumps(GOOD).encode(), b'{"prompt": "caf\xe9", "responses": ["x"], "rewards": [1.0]}',
             b'{"prompt": "count to 2", "responses": ["1 2"], "rewards": [1.0]',
             b'{"prompt": "count to 2", "responses": ["1 2"], "rewards": [1e309]}', json.dumps(GOOD).encode()]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_unreadable_lines_are_named_by_file_and_line(tmp_path, tokenizer):
    path = unreadable_file(tmp_path)
    with pytest.raises(ValueError, match=r"mixed\.jsonl, line 2: not valid UTF-8"):
        reward_dataset(tokenizer, source="json", data_files=path)
    lines = open(path, "rb").read().split(b"\n")
    del lines[1]
    (tmp_path / "no_utf8.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"no_utf8\.jsonl, line 2, field 'line': not valid JSON"):
        reward_dataset(tokenizer, source="json", data_files=str(tmp_path / "no_utf8.jsonl"))
    del lines[1]
    (tmp_path / "inf.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"inf\.jsonl, line 2, field 'rewards\[0\]': reward inf is not finite"):
        reward_dataset(tokenizer, source="json", data_files=str(tmp_path / "inf.jsonl"))


def test_drop_mode_skips_and_counts_unreadable_lines(tmp_path, tokenizer):
    dataset = reward_dataset(tokenizer, source="json", data_files=unreadable_file(tmp_path), on_bad_row="drop")
    assert len(dataset) == 2
    assert dataset.dropped == {"not_utf8": 1, "malformed_json": 1, "non_finite_reward": 1}


def test_a_json_array_file_and_a_split_slice(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "count to 3", "responses": ["1 2 3"], "rewards": [1.0]}]))
    assert len(reward_dataset(tokenizer, source="json", data_files=str(path))) == 3
    assert len(reward_dataset(tokenizer, source="json", data_files=str(path), split="train[:2]")) == 2
    path.write_text('[{"prompt": "a",\n "responses": ["b"], "rewards": [1.0]},\n {"prompt": }]')
    with pytest.raises(ValueError, match=r"rows\.json, line 3: not valid JSON"):
        reward_dataset(tokenizer, source="json", data_files=str(path))


# --- Tokenize once -------------------------------------------------------------------------------------------------

def test_tokenized_copy_is_reused_until_data_tokenizer_or_settings_change(tmp_path, tokenizer, monkeypatch):
    module = importlib.import_module("rao_tune.data.reward_dataset")  # the package re-exports a function of that name

    calls = []
    tokenize = module._tokenize_record
    monkeypatch.setattr(module, "_tokenize_record", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    cache = str(tmp_path / "cache")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD])

    def build(**overrides):
        calls.clear()
        dataset = reward_dataset(tokenizer, source="json", data_files=path, cache_dir=cache, **overrides)
        return dataset, len(calls)

    first, tokenized = build()
    assert tokenized == 3
    again, tokenized = build()
    assert tokenized == 0 and again.fingerprint == first.fingerprint and again[2] == first[2]
    assert build(max_seq_len=64)[1] == 3  # another max_seq_len: another copy
    plain = PlainTextTokenizer(tokenizer)
    calls.clear()
    other = RewardAnnotatedDataset(plain, source="json", data_files=path, cache_dir=cache)
    assert len(calls) == 3 and other.fingerprint != first.fingerprint  # another tokenizer (chat format)
    write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])  # the data changed
    changed, tokenized = build()
    assert tokenized == 2 and len(changed) == 2
    # complete copies only: no partial folder is left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if "partial" in p.name]


def test_responses_per_prompt_and_standardized_rewards(tmp_path, tokenizer):
    rows = [
        {"prompt": "count to 3", "responses": ["1 2 3", "1 2", "1", "3"], "rewards": [1.0, 0.5, 0.25, 0.0]},
        {"prompt": "reverse: a b", "responses": ["b a", "a b"], "rewards": [2.0, -1.0]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = reward_dataset(tokenizer, source="json", data_files=path)
    two = reward_dataset(tokenizer, source="json", data_files=path, responses_per_prompt=2, standardize_rewards=True)

    kept = [1.0, 0.5, 2.0, -1.0]  # the first two responses of each prompt
    mean = sum(kept) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in kept) / 3)  # sample standard deviation, as torch.std
    assert two[0]["response_tokens"] == full[0]["response_tokens"][:2]
    assert two[0]["rewards"] == pytest.approx([(1.0 - mean) / std, (0.5 - mean) / std])
    assert two[1]["response_tokens"] == full[1]["response_tokens"]
    assert two.rewards_per_prompt() == [two[0]["rewards"], two[1]["rewards"]]
    assert float(two.all_rewards().mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(two.all_rewards().std()) == pytest.approx(1.0)
    assert two.fingerprint != full.fingerprint  # reference log-probs computed for one are not read for the other
    with pytest.raises(ValueError, match="responses_per_prompt must be null or >= 1"):
        reward_dataset(tokenizer, source="json", data_files=path, responses_per_prompt=0)
