"""Turn one raw dataset row, in any supported layout, into (prompt messages, responses, rewards).

Supported layouts:

- ``native``: ``prompt`` (a string, or a list of chat messages ``{"role", "content"}``), ``responses``
  (a list of strings or assistant messages) and ``rewards`` (a list of floats, one per response).
- ``ultrafeedback_binarized`` (``HuggingFaceH4/ultrafeedback_binarized``): ``chosen`` and ``rejected``
  message lists that share their prompt turns, with ``score_chosen`` and ``score_rejected``.
- ``ultrafeedback`` (``openbmb/UltraFeedback``): ``instruction`` and ``completions``, a list of dicts with
  a ``response`` and a score found at a configurable (dotted) field, ``overall_score`` by default.

Every problem raises :class:`BadRowError` naming the field, so the caller can add file and row.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from torchtune.data import Message

LAYOUTS = ("native", "ultrafeedback_binarized", "ultrafeedback")


class BadRowError(ValueError):
    """A row that cannot be used; ``field`` names the offending field, ``reason`` is a short category."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field = field
        self.reason = reason


def detect_layout(column_names: Sequence[str], *, require_rewards: bool = True) -> str:
    """Pick the layout from the dataset's columns; without ``require_rewards`` (rows to be scored) the reward
    columns need not exist."""
    columns = set(column_names)
    native, binarized = {"prompt", "responses"}, {"chosen", "rejected"}
    if require_rewards:
        native, binarized = native | {"rewards"}, binarized | {"score_chosen", "score_rejected"}
    if native <= columns:
        return "native"
    if binarized <= columns:
        return "ultrafeedback_binarized"
    if {"instruction", "completions"} <= columns:
        return "ultrafeedback"
    raise ValueError(
        f"cannot tell the dataset layout from its columns {sorted(columns)}; expected one of: "
        f"native ({', '.join(sorted(native))}), ultrafeedback_binarized ({', '.join(sorted(binarized))}) "
        "or ultrafeedback (instruction, completions); or set layout= explicitly"
    )


def parse_row(
    row: Mapping[str, Any], layout: str, *, score_field: str = "overall_score", require_rewards: bool = True
) -> tuple[list[Message], list[str], Optional[list[float]]]:
    """Return the prompt as messages (all masked), the response texts and their rewards.

    With ``require_rewards=False`` (rows about to be scored, e.g. by ``rao_tune.annotate``) the reward fields
    are not read at all, so they may be missing or stale, and the rewards come back as None.
    """
    if layout == "native":
        prompt = _prompt_messages(_require(row, "prompt"), "prompt")
        responses_raw = _require(row, "responses")
        if not isinstance(responses_raw, (list, tuple)):
            raise BadRowError("responses", "'responses' must be a list", "malformed")
        responses = [_response_text(item, f"responses[{i}]") for i, item in enumerate(responses_raw)]
        rewards = None
        if require_rewards:
            rewards_raw = _require(row, "rewards")
            if not isinstance(rewards_raw, (list, tuple)):
                raise BadRowError("rewards", "'rewards' must be a list of numbers", "malformed")
            rewards = [_reward(value, f"rewards[{i}]") for i, value in enumerate(rewards_raw)]
    elif layout == "ultrafeedback_binarized":
        chosen = _message_list(_require(row, "chosen"), "chosen")
        rejected = _message_list(_require(row, "rejected"), "rejected")
        if chosen[:-1] != rejected[:-1]:
            raise BadRowError("rejected", "'chosen' and 'rejected' do not share the same prompt turns", "malformed")
        for field, conversation in (("chosen", chosen), ("rejected", rejected)):
            if len(conversation) < 2 or conversation[-1].get("role") != "assistant":
                raise BadRowError(field, f"'{field}' must end with an assistant turn after the prompt", "malformed")
        prompt = _prompt_messages(chosen[:-1], "chosen")
        responses = [_response_text(chosen[-1], "chosen[-1]"), _response_text(rejected[-1], "rejected[-1]")]
        rewards = None
        if require_rewards:
            rewards = [
                _reward(row.get("score_chosen"), "score_chosen"),
                _reward(row.get("score_rejected"), "score_rejected"),
            ]
    elif layout == "ultrafeedback":
        prompt = _prompt_messages(_require(row, "instruction"), "instruction")
        completions = _require(row, "completions")
        if not isinstance(completions, (list, tuple)):
            raise BadRowError("completions", "'completions' must be a list", "malformed")
        responses, rewards = [], ([] if require_rewards else None)
        for i, completion in enumerate(completions):
            if not isinstance(completion, Mapping):
                raise BadRowError(f"completions[{i}]", "each completion must be a mapping", "malformed")
            responses.append(_response_text(completion.get("response"), f"completions[{i}].response"))
            if require_rewards:
                # openbmb/UltraFeedback writes its annotation ratings as text ("5"): read those as numbers here
                rewards.append(_reward(_dotted_get(completion, score_field), f"completions[{i}].{score_field}",
                                       text_allowed=True))
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")

    if not responses:
        raise BadRowError("responses", "the row has no responses", "no_responses")
    if rewards is not None and len(responses) != len(rewards):
        raise BadRowError(
            "rewards", f"{len(responses)} responses but {len(rewards)} rewards", "count_mismatch"
        )
    if rewards is not None:
        _refuse_contradictions(responses, rewards)
    return prompt, responses, rewards


def _refuse_contradictions(responses: Sequence[str], rewards: Sequence[float]) -> None:
    """One text with two rewards is a labelling error: a pairwise loss would train on a pair whose chosen and
    rejected answers are the same text."""
    first_seen: dict[str, int] = {}
    for index, response in enumerate(responses):
        earlier = first_seen.setdefault(response, index)
        if earlier != index and rewards[earlier] != rewards[index]:
            raise BadRowError(
                "responses", f"responses {earlier} and {index} are the same text with rewards {rewards[earlier]} and "
                f"{rewards[index]}", "contradicting_duplicate",
            )


def _require(row: Mapping[str, Any], field: str) -> Any:
    if field not in row or row[field] is None:
        raise BadRowError(field, f"missing field '{field}'", "missing_field")
    return row[field]


def _message_list(value: Any, field: str) -> list[dict]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, Mapping) for m in value):
        raise BadRowError(field, f"'{field}' must be a list of chat messages", "malformed")
    return [dict(m) for m in value]


def _prompt_messages(value: Any, field: str) -> list[Message]:
    """A prompt string becomes one user turn; a message list keeps its roles. Prompt turns are all masked."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRowError(field, f"'{field}' is empty", "empty_prompt")
        return [Message(role="user", content=value, masked=True)]
    messages = _message_list(value, field)
    if not messages:
        raise BadRowError(field, f"'{field}' has no messages", "empty_prompt")
    for i, message in enumerate(messages):
        if not isinstance(message.get("content"), str) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRowError(f"{field}[{i}]", "a message needs a role and string content", "malformed")
    return [Message(role=m["role"], content=m["content"], masked=True) for m in messages]


def _response_text(value: Any, field: str) -> str:
    if isinstance(value, Mapping):
        if value.get("role", "assistant") != "assistant":
            raise BadRowError(field, f"response message must have role 'assistant', got {value.get('role')!r}", "malformed")
        value = value.get("content")
    if not isinstance(value, str):
        raise BadRowError(field, f"response must be a string, got {type(value).__name__}", "malformed")
    if not value.strip():
        raise BadRowError(field, "response is empty", "empty_response")
    return value


def _reward(value: Any, field: str, text_allowed: bool = False) -> float:
    if value is None:
        raise BadRowError(field, "reward is missing", "missing_reward")
    if isinstance(value, bool) or (isinstance(value, (str, bytes)) and not text_allowed):
        # "0.5" or true where the layout holds numbers: a quoting or export mistake, not a score
        raise BadRowError(field, f"reward {value!r} is a {type(value).__name__}, not a number", "non_numeric_reward")
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise BadRowError(field, f"reward {value!r} is not a number", "non_numeric_reward") from None
    if not math.isfinite(reward):
        raise BadRowError(field, f"reward {value!r} is not finite", "non_finite_reward")
    return reward


def _dotted_get(mapping: Mapping[str, Any], path: str) -> Any:
    value: Any = mapping
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value
