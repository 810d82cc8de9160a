"""Reward-annotated preference data: each prompt with one or more responses, each with a reward.

Every row is tokenized with the model's own tokenizer and chat format. The prompt is everything up to and
including the assistant header (what the model sees before it starts answering, as in torchtune's
generation); the response is what follows, minus the tokens the tokenizer masks (e.g. a final EOS).
So prompt tokens never count as response tokens, and every response of a prompt shares the prompt tokens.
"""

from __future__ import annotations

import collections
import inspect
import logging
from typing import Any, Mapping, Optional

import torch
from datasets import Dataset as HFDataset
from datasets import load_dataset
from torch.utils.data import Dataset
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm.auto import tqdm

from rao_tune.data._rows import LAYOUTS, BadRowError, detect_layout, parse_row

# datasets' packaged loaders that read local files rather than a hub id.
_FILE_LOADERS = ("json", "csv", "parquet", "arrow", "text")

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


def load_rows(
    source: str,
    *,
    split: str,
    layout: str = "auto",
    column_map: Optional[Mapping[str, str]] = None,
    on_bad_row: str = "error",
    require_rewards: bool = True,
    **load_dataset_kwargs: Any,
) -> tuple[HFDataset, str, str]:
    """``datasets.load_dataset`` with our checks: returns the rows (columns renamed by ``column_map``, which
    maps our names to the data's), their layout (detected when ``auto``) and the origin named in errors."""
    if on_bad_row not in ("error", "drop"):
        raise ValueError(f"on_bad_row must be 'error' or 'drop', got {on_bad_row!r}")
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    data_files = load_dataset_kwargs.get("data_files")
    if source in _FILE_LOADERS and not data_files and not load_dataset_kwargs.get("data_dir"):
        # Without files, datasets' file loaders would read whatever matches in the working directory.
        raise ValueError(f"dataset source {source!r} reads local files: set data_files (e.g. dataset.data_files=train.jsonl)")
    rows = load_dataset(source, split=split, **load_dataset_kwargs)
    if column_map:
        rows = rows.rename_columns({old: new for new, old in column_map.items() if old != new})
    if layout == "auto":
        layout = detect_layout(rows.column_names, require_rewards=require_rewards)
    return rows, layout, str(data_files) if data_files else source


class RewardAnnotatedDataset(Dataset):
    """Map-style dataset of prompts with k >= 1 rewarded responses each, tokenized up front.

    Each item is ``{"prompt_tokens": list[int], "response_tokens": list[list[int]], "rewards": list[float]}``.

    Args:
        tokenizer: the model's torchtune tokenizer (its chat format is applied).
        source: ``datasets.load_dataset`` path: a hub id, or ``"json"`` / ``"parquet"`` with ``data_files``.
        layout: ``"auto"`` (from the columns), ``"native"``, ``"ultrafeedback_binarized"`` or ``"ultrafeedback"``.
        score_field: for ``"ultrafeedback"``, the (dotted) completion field used as reward.
        column_map: rename columns to the native names, e.g. ``{"prompt": "question"}``.
        max_seq_len: longest prompt + response; responses are cut to fit, a prompt that leaves no room
            for a response is a bad row.
        on_bad_row: ``"error"`` stops with the file, row and field; ``"drop"`` skips the row and logs counts.
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
        **load_dataset_kwargs: Any,
    ):
        raw, self.layout, self.origin = load_rows(
            source, split=split, layout=layout, column_map=column_map, on_bad_row=on_bad_row, **load_dataset_kwargs
        )

        self._samples: list[dict] = []
        self.dropped: collections.Counter = collections.Counter()
        first_token: Optional[int] = None
        for row_index, row in enumerate(tqdm(raw, desc=f"tokenizing {self.origin}", disable=not _is_rank_zero())):
            try:
                prompt, responses, rewards = parse_row(row, self.layout, score_field=score_field)
                prompt_tokens, response_tokens = tokenize_prompt_and_responses(tokenizer, prompt, responses)
                if len(prompt_tokens) >= max_seq_len:
                    raise BadRowError(
                        "prompt", f"prompt has {len(prompt_tokens)} tokens, max_seq_len is {max_seq_len}", "prompt_too_long"
                    )
                if first_token is not None and prompt_tokens[0] != first_token:
                    # RAO's normaliser rests on a universal first token t0 shared by every sequence.
                    raise BadRowError(
                        "prompt",
                        f"sequence starts with token {prompt_tokens[0]}, not the shared first token t0={first_token}",
                        "first_token",
                    )
                room = max_seq_len - len(prompt_tokens)
                response_tokens = [tokens[:room] for tokens in response_tokens]
            except BadRowError as err:
                if on_bad_row == "error":
                    raise ValueError(f"{self.origin}, row {row_index}, field '{err.field}': {err}") from None
                self.dropped[err.reason] += 1
                continue
            if first_token is None:
                first_token = prompt_tokens[0]
            self._samples.append({"prompt_tokens": prompt_tokens, "response_tokens": response_tokens, "rewards": rewards})

        if self.dropped:
            log.warning("%s: dropped %d bad rows: %s", self.origin, sum(self.dropped.values()), dict(self.dropped))
        if not self._samples:
            raise ValueError(f"{self.origin}: no usable rows")
        self.first_token = first_token

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict:
        return self._samples[index]

    def all_rewards(self) -> torch.Tensor:
        """Every response's reward, flattened: what ``PreferenceLoss.calibrate`` sees."""
        return torch.tensor([r for sample in self._samples for r in sample["rewards"]], dtype=torch.float64)


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
