"""Reward-annotated preference data: each prompt with one or more responses, each with a reward.

Every row is tokenized with the model's own tokenizer and chat format. The prompt is everything up to and
including the assistant header (what the model sees before it starts answering, as in torchtune's
generation); the response is what follows, minus the tokens the tokenizer masks (e.g. a final EOS).
So prompt tokens never count as response tokens, and every response of a prompt shares the prompt tokens.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import json
import logging
import os
import pickle
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from datasets import Dataset as HFDataset
from datasets import Features, Sequence, Value, load_from_disk
from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from rao_tune.data._rows import BadRowError, parse_row
from rao_tune.data._sources import RawRows, RowReader, data_identity, load_rows
from rao_tune.files import fsync_tree, tree_checksums, tree_damage, write_atomically

log = logging.getLogger(__name__)


def tokenize_conversation(tokenizer: ModelTokenizer, messages: list[Message], *, add_end_tokens: bool):
    """``tokenizer.tokenize_messages`` across torchtune tokenizers, whose end-token flag is spelled differently
    (``add_end_tokens`` for Llama3, ``add_eos`` for Qwen2 and sentencepiece-based ones)."""
    params = inspect.signature(tokenizer.tokenize_messages).parameters
    flag = "add_end_tokens" if "add_end_tokens" in params else "add_eos"
    return tokenizer.tokenize_messages(messages, **{flag: add_end_tokens})


def tokenize_prompt(tokenizer: ModelTokenizer, prompt: list[Message]) -> list[int]:
    """The prompt's tokens in the tokenizer's chat format, ending with an open assistant header: what training,
    sampling, generation and chat-format evaluation all condition on."""
    tokens, _ = tokenize_conversation(tokenizer, prompt + [Message(role="assistant", content="")], add_end_tokens=False)
    return tokens


def tokenize_prompt_and_responses(
    tokenizer: ModelTokenizer, prompt: list[Message], responses: list[str]
) -> tuple[list[int], list[list[int]]]:
    """Return the prompt tokens (ending with the assistant header) and each response's trainable tokens."""
    prompt_tokens = tokenize_prompt(tokenizer, prompt)
    response_tokens = []
    for i, text in enumerate(responses):
        tokens, masked = tokenize_conversation(
            tokenizer, prompt + [Message(role="assistant", content=text, masked=False)], add_end_tokens=True
        )
        if tokens[: len(prompt_tokens)] != prompt_tokens:
            # Only a chat format that rewrites the prompt depending on the answer can cause this.
            raise BadRowError(
                f"responses[{i}]", "the tokenized conversation does not start with the tokenized prompt", "template"
            )
        trainable = [tok for tok, is_masked in zip(tokens[len(prompt_tokens):], masked[len(prompt_tokens):]) if not is_masked]
        if not trainable:
            raise BadRowError(f"responses[{i}]", "response has no tokens after tokenization", "empty_response")
        response_tokens.append(trainable)
    return prompt_tokens, response_tokens


class RewardAnnotatedDataset(Dataset):
    """Map-style dataset of prompts with k >= 1 rewarded responses each, tokenized once and memory-mapped.

    Each item is ``{"prompt_tokens": list[int], "response_tokens": list[list[int]], "rewards": list[float]}``.

    The tokenized rows are built once, by process 0 with ``datasets.map`` over ``num_proc`` workers, and stored
    (Arrow, written to a temporary folder and renamed) in ``cache_dir`` under a fingerprint of the data (local
    files: name, size, mtime and sampled bytes; hub data: datasets' fingerprint of the loaded revision), the
    tokenizer (its pickled state: vocabulary, special tokens, chat format), the layout, column map, score
    field, ``max_seq_len`` and ``on_bad_row``. Every process then memory-maps that copy; a later start with the
    same fingerprint reads it without tokenizing.

    Args:
        tokenizer: the model's torchtune tokenizer (its chat format is applied).
        source: ``datasets.load_dataset`` path: a hub id, or ``"json"`` / ``"parquet"`` with ``data_files``.
        layout: ``"auto"`` (from the columns), ``"native"``, ``"ultrafeedback_binarized"`` or ``"ultrafeedback"``.
        score_field: for ``"ultrafeedback"``, the (dotted) completion field used as reward.
        column_map: rename columns to the native names, e.g. ``{"prompt": "question"}``.
        max_seq_len: longest prompt + response; responses are cut to fit, a prompt that leaves no room
            for a response is a bad row.
        on_bad_row: ``"error"`` stops with the file, line (or row) and field; ``"drop"`` skips the row (or an
            unreadable line) and logs counts.
        cache_dir: where tokenized copies live (default ``$RAO_TUNE_CACHE/tokenized``, ``~/.cache/rao_tune``).
        num_proc: tokenizing processes (default: up to 8 CPUs for 2,000 rows or more, else 1).
        responses_per_prompt: keep only the first k responses of each prompt (null: all), e.g. to compare 2 with
            4 responses per prompt on the same data; a prompt keeps all it has when it has fewer.
        standardize_rewards: train on ``(reward - mean) / std`` with the mean and standard deviation over every
            response of the data, so that a loss's beta means the same whatever the reward model's scale.
        split, **load_dataset_kwargs: passed to ``datasets.load_dataset``.
    """

    def __init__(
        self,
        tokenizer: ModelTokenizer,
        *,
        source: str,
        layout: str = "auto",
        score_field: str = "overall_score",
        column_map: Optional[Mapping[str, str]] = None,
        max_seq_len: int = 1024,
        on_bad_row: str = "error",
        split: str = "train",
        cache_dir: Optional[str] = None,
        num_proc: Optional[int] = None,
        responses_per_prompt: Optional[int] = None,
        standardize_rewards: bool = False,
        **load_dataset_kwargs: Any,
    ):
        if responses_per_prompt is not None and responses_per_prompt < 1:
            raise ValueError(f"responses_per_prompt must be null or >= 1, got {responses_per_prompt}")
        def build() -> Path:
            settings = dict(split=split, layout=layout, score_field=score_field, column_map=dict(column_map or {}),
                            max_seq_len=max_seq_len, on_bad_row=on_bad_row)
            return tokenized_copy(
                tokenizer,
                data_identity(source, split=split, **load_dataset_kwargs),
                lambda: load_rows(source, split=split, layout=layout, column_map=column_map, on_bad_row=on_bad_row,
                                  **load_dataset_kwargs),
                settings,
                Path(cache_dir or default_cache_dir()),
                num_proc,
            )

        path = _built_by_rank_zero(build)
        self._rows = load_from_disk(str(path / "rows"))
        meta = json.loads((path / "meta.json").read_text())
        self.fingerprint, self.layout, self.origin = meta["fingerprint"], meta["layout"], meta["origin"]
        self.first_token, self.dropped = meta["first_token"], collections.Counter(meta["dropped"])
        self.longest_sequence, self.max_token_id = meta["longest_sequence"], meta["max_token_id"]
        if self.dropped and _is_rank_zero():
            log.warning("%s: dropped %d bad rows: %s", self.origin, sum(self.dropped.values()), dict(self.dropped))
        # Both act on the items, not the tokenized copy; the fingerprint (which keys the reference log-probs) says so.
        self._keep = responses_per_prompt
        self._reward_shift, self._reward_scale = 0.0, 1.0
        if standardize_rewards:
            raw = torch.tensor([r for rewards in self._kept(self._rows["rewards"]) for r in rewards], dtype=torch.float64)
            if raw.numel() < 2 or float(raw.std()) == 0.0:
                raise ValueError(f"{self.origin}: standardize_rewards needs rewards that vary, got {raw.tolist()[:8]}")
            self._reward_shift, self._reward_scale = float(raw.mean()), float(raw.std())
            if _is_rank_zero():
                log.info("%s: rewards standardized: (r - %.6g) / %.6g", self.origin, self._reward_shift, self._reward_scale)
        if responses_per_prompt is not None or standardize_rewards:
            self.fingerprint += f"-keep{responses_per_prompt}-standardized{standardize_rewards}"
        self.standardized = standardize_rewards

    def standardize_like(self, training: Any) -> None:
        """Score these (held-out) rows on ``training``'s reward scale: its mean and standard deviation, not their
        own, so the targets mean what they meant in training (and for its z0)."""
        if not getattr(training, "standardized", False):
            raise ValueError(f"{self.origin}: standardize_rewards is set for the held-out data but not for the "
                             "training data; set it the same on dataset and eval_dataset")
        self._reward_shift, self._reward_scale = training._reward_shift, training._reward_scale
        self.fingerprint += f"-scale{self._reward_shift:.17g}/{self._reward_scale:.17g}"
        if _is_rank_zero():
            log.info("%s: rewards standardized with the training data's (r - %.6g) / %.6g", self.origin,
                     self._reward_shift, self._reward_scale)

    def _kept(self, per_prompt: list[list]) -> list[list]:
        return per_prompt if self._keep is None else [values[: self._keep] for values in per_prompt]

    def _scaled(self, rewards: list[float]) -> list[float]:
        return [(r - self._reward_shift) / self._reward_scale for r in rewards]

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        row = self._rows[index]
        kept = slice(None, self._keep)
        return {"prompt_tokens": row["prompt_tokens"], "response_tokens": row["response_tokens"][kept],
                "rewards": self._scaled(row["rewards"][kept])}

    def rewards_per_prompt(self) -> list[list[float]]:
        """Each prompt's rewards (what ``PreferenceLoss.check_data`` sees)."""
        return [self._scaled(rewards) for rewards in self._kept(self._rows["rewards"])]

    def all_rewards(self) -> torch.Tensor:
        """Every response's reward, flattened: what ``PreferenceLoss.calibrate`` sees."""
        return torch.tensor([r for rewards in self.rewards_per_prompt() for r in rewards], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ tokenize once
_FORMAT = "rao_tune.tokenized.v2"  # change when the tokenized layout or its rules change (v2: contradicting duplicates)
_FEATURES = Features({
    "prompt_tokens": Sequence(Value("int32")),
    "response_tokens": Sequence(Sequence(Value("int32"))),
    "rewards": Sequence(Value("float64")),
    "num_tokens": Value("int32"),  # prompt + longest response
    "max_token_id": Value("int32"),
    "first_token": Value("int64"),  # -1 for a bad row
    "bad_field": Value("string"),
    "bad_reason": Value("string"),
    "bad_message": Value("string"),
    "where": Value("string"),
})


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAO_TUNE_CACHE", Path.home() / ".cache" / "rao_tune")) / "tokenized"


def tokenizer_identity(tokenizer: ModelTokenizer) -> str:
    """A digest of the tokenizer: its pickled state (vocabulary, merges, special tokens, settings) where it
    pickles, else its tokenization of a fixed probe text and conversation."""
    try:
        return "pickle:" + hashlib.sha256(pickle.dumps(tokenizer)).hexdigest()
    except Exception:  # e.g. a tokenizer holding an lru_cache of a bound method
        probe = "".join(chr(c) for c in range(32, 127)) + " éñ中文🙂 \t\n  count to 3\n"
        conversation = [Message(role="system", content="be brief"), Message(role="user", content=probe)]
        tokens = tokenize_prompt_and_responses(tokenizer, conversation, [probe])
        return "probe:" + hashlib.sha256(f"{type(tokenizer).__qualname__}:{tokens}".encode()).hexdigest()


def _copy_damage(path: Path) -> Optional[str]:
    """Why the tokenized copy at ``path`` cannot be used (None: it checks out against its recorded checksums)."""
    try:
        checksums = json.loads((path / "meta.json").read_text())["checksums"]
    except (OSError, ValueError, KeyError) as err:
        return f"meta.json unreadable: {err!r}"
    return tree_damage(path / "rows", checksums)


def tokenized_copy(
    tokenizer: ModelTokenizer,
    identity: str,
    load: Callable[[], RawRows],
    settings: dict,
    cache_dir: Path,
    num_proc: Optional[int],
) -> Path:
    """The folder of the tokenized copy of the data that ``identity`` names, tokenized with these ``settings``;
    when ``cache_dir`` has none yet, the rows are read (``load``) and tokenized now."""
    key = hashlib.sha256(json.dumps(
        {"format": _FORMAT, "data": identity, "tokenizer": tokenizer_identity(tokenizer), **settings},
        sort_keys=True).encode()).hexdigest()
    path = cache_dir / key[:24]
    if (path / "meta.json").exists():
        damage = _copy_damage(path)
        if damage is None:
            log.info("tokenized copy found in %s", path)
            return path
        log.warning("tokenized copy %s is damaged (%s): tokenizing again", path, damage)
        shutil.rmtree(path, ignore_errors=True)

    started = time.perf_counter()
    raw = load()
    if num_proc is None:
        num_proc = min(8, os.cpu_count() or 1) if len(raw.dataset) >= 2000 else 1
    tokenize = partial(_tokenize_record, tokenizer=tokenizer, reader=raw.reader,
                       score_field=settings["score_field"], max_seq_len=settings["max_seq_len"])
    tokenized = raw.dataset.map(
        tokenize, with_indices=True, remove_columns=raw.dataset.column_names, features=_FEATURES,
        num_proc=num_proc if num_proc > 1 else None, desc=f"tokenizing {raw.origin}",
    )
    dropped, first_token = _check_rows(tokenized, raw, settings["on_bad_row"])
    kept = tokenized.filter(  # good rows that start with the shared t0
        lambda reasons, firsts: [not r and f == first_token for r, f in zip(reasons, firsts)],
        input_columns=["bad_reason", "first_token"], batched=True,
    ).remove_columns(["bad_field", "bad_reason", "bad_message", "where", "first_token"])
    if len(kept) == 0:
        raise ValueError(f"{raw.origin}: no usable rows (dropped: {dict(dropped)})")
    meta = {
        "format": _FORMAT, "fingerprint": key, "origin": raw.origin, "layout": raw.layout, "rows": len(kept),
        "dropped": dict(dropped), "first_token": first_token, "settings": settings,
        "longest_sequence": max(kept["num_tokens"]), "max_token_id": max(kept["max_token_id"]),
    }
    partial_path = cache_dir / f"{key[:24]}.partial-{os.getpid()}"
    shutil.rmtree(partial_path, ignore_errors=True)
    kept.save_to_disk(str(partial_path / "rows"))
    meta["checksums"] = tree_checksums(partial_path / "rows")  # verified at each load: a bad copy is rebuilt
    write_atomically(partial_path / "meta.json", json.dumps(meta, indent=2) + "\n")
    fsync_tree(partial_path)
    try:
        os.replace(partial_path, path)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(partial_path, ignore_errors=True)
    log.info("%s: %d rows tokenized in %.1f s into %s", raw.origin, len(kept), time.perf_counter() - started, path)
    return path


def _tokenize_record(
    record: dict, index: int, *, tokenizer: ModelTokenizer, reader: RowReader, score_field: str, max_seq_len: int
) -> dict:
    """One row to token ids, or to the reason it is unusable (``bad_*``), in a worker process."""
    output = {"prompt_tokens": [], "response_tokens": [], "rewards": [], "num_tokens": 0, "max_token_id": 0,
              "first_token": -1, "bad_field": "", "bad_reason": "", "bad_message": "", "where": ""}
    try:
        prompt, responses, rewards = parse_row(reader.row(record), reader.layout, score_field=score_field)
        prompt_tokens, response_tokens = tokenize_prompt_and_responses(tokenizer, prompt, responses)
        if len(prompt_tokens) >= max_seq_len:
            raise BadRowError(
                "prompt", f"prompt has {len(prompt_tokens)} tokens, max_seq_len is {max_seq_len}", "prompt_too_long"
            )
        room = max_seq_len - len(prompt_tokens)
        response_tokens = [tokens[:room] for tokens in response_tokens]
    except BadRowError as err:
        output.update(bad_field=err.field, bad_reason=err.reason, bad_message=str(err), where=reader.where(index, record))
        return output
    output.update(
        prompt_tokens=prompt_tokens, response_tokens=response_tokens, rewards=rewards, first_token=prompt_tokens[0],
        num_tokens=len(prompt_tokens) + max(len(tokens) for tokens in response_tokens),
        max_token_id=max(max(prompt_tokens), *(max(tokens) for tokens in response_tokens)),
    )
    return output


def _check_rows(tokenized: HFDataset, raw: RawRows, on_bad_row: str) -> tuple[collections.Counter, Optional[int]]:
    """Bad rows counted by reason (or the first one raised, with its file, line or row and field), and the shared
    first token t0: RAO's normaliser rests on every sequence starting with the same token."""
    reasons = tokenized["bad_reason"]
    bad = [i for i, reason in enumerate(reasons) if reason]
    if bad and on_bad_row == "error":
        first = tokenized[bad[0]]
        raise ValueError(f"{first['where']}, field '{first['bad_field']}': {first['bad_message']}")
    dropped = raw.skipped + collections.Counter(reasons[i] for i in bad)
    first_tokens = tokenized["first_token"]
    good = [i for i, reason in enumerate(reasons) if not reason]
    if not good:
        return dropped, None
    first_token = first_tokens[good[0]]
    strays = [i for i in good if first_tokens[i] != first_token]
    if strays and on_bad_row == "error":
        raise ValueError(
            f"{raw.reader.where(strays[0], raw.dataset[strays[0]])}, field 'prompt': sequence starts with token "
            f"{first_tokens[strays[0]]}, not the shared first token t0={first_token}"
        )
    dropped["first_token"] += len(strays)
    return +dropped, first_token


def _built_by_rank_zero(build: Callable[[], Path]) -> Path:
    """Rank 0 builds (or finds) the tokenized copy and tells the others where it is, or why it failed; a rank
    that cannot see that folder (no shared file system) builds its own."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return build()
    if torch.distributed.get_rank() == 0:
        try:
            path = build()
        except Exception as err:
            torch.distributed.broadcast_object_list([f"!{type(err).__name__}: {err}"], src=0)
            raise
        torch.distributed.broadcast_object_list([str(path)], src=0)
        return path
    outcome: list[Any] = [None]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0].startswith("!"):
        raise ValueError(f"rank 0 could not build the dataset: {outcome[0][1:]}")
    path = Path(outcome[0])
    return path if (path / "meta.json").exists() else build()


def reward_dataset(tokenizer: ModelTokenizer, **kwargs: Any) -> RewardAnnotatedDataset:
    """Config builder: ``_component_: rao_tune.data.reward_dataset`` with ``source``, ``data_files``, ..."""
    return RewardAnnotatedDataset(tokenizer, **kwargs)


def ultrafeedback_binarized_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str = "HuggingFaceH4/ultrafeedback_binarized",
    split: str = "train_prefs",
    **kwargs: Any,
) -> RewardAnnotatedDataset:
    """UltraFeedback pairs with their GPT-4 scores as rewards (the paper's RAO training data)."""
    return RewardAnnotatedDataset(tokenizer, source=source, split=split, layout="ultrafeedback_binarized", **kwargs)


def ultrafeedback_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str = "openbmb/UltraFeedback",
    split: str = "train",
    score_field: str = "overall_score",
    **kwargs: Any,
) -> RewardAnnotatedDataset:
    """openbmb/UltraFeedback: every completion of a prompt (usually 4), scored by ``score_field``."""
    return RewardAnnotatedDataset(
        tokenizer, source=source, split=split, layout="ultrafeedback", score_field=score_field, **kwargs
    )


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
