"""Scorers that give each (prompt, response) a reward, for ``recipes/annotate_rewards.py``.

A scorer has ``score(prompts, responses) -> list[float]``: ``prompts[i]`` is the chat that ``responses[i]``
answers, as a list of ``{"role", "content"}`` dicts. In a config, ``scorer`` is one of:

- :class:`RewardModelScorer`: a trained reward model (:func:`rao_tune.models.reward_model`), read at the last
  token of ``prompt + response`` tokenized in the model's chat format, exactly as the RAO dataset tokenizes
  (responses to the same prompt share one copy of it in packed rows).
- :func:`python_reward` with ``function: my_module.my_reward``: any Python function ``(prompt, response) ->
  float`` (a rule-based reward).
- any class whose instances are ``(prompt, response) -> float`` callables, given by ``_component_`` with its
  constructor arguments (e.g. :class:`KeywordReward`).

Rule-based rewards get the prompt as a plain string when it is a single user message (the common case),
else as the list of message dicts.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, training, utils
from torchtune.data import Message

from rao_tune.data.collate import longest_sequence
from rao_tune.data.reward_dataset import tokenize_prompt_and_responses
from rao_tune.models.reward import last_token_scores
from rao_tune.training.attention import model_inputs, packed_collator


Prompt = list[dict[str, str]]


def _build(component: Any) -> Any:
    """A ``_component_`` mapping from the config is instantiated; an already built object is used as is."""
    if isinstance(component, (Mapping, DictConfig)) and "_component_" in component:
        return config.instantiate(OmegaConf.create(dict(component)))
    return component


class RewardModelScorer:
    """Scores with a reward model; each process holds a full copy (no FSDP, no collectives), so processes can
    score different amounts of data at their own pace.

    Args:
        model: the model's config (``_component_: rao_tune.models.reward_model``, ``decoder``, sizes) or a module.
        checkpointer: config of a checkpointer whose ``load_checkpoint()["model"]`` is the torchtune state dict
            (``rao_tune.models.RewardModelHFCheckpointer``), or None when ``model`` is a loaded module.
        tokenizer: the model's tokenizer config (its chat format is applied) or a tokenizer.
        device, dtype: where and in what precision the model runs (``cuda`` uses the process's LOCAL_RANK GPU).
        max_seq_len: prompt + response are cut to this many tokens (the end of the response goes first, as the
            RAO dataset cuts responses); None: the model's own ``max_seq_len``.
    """

    def __init__(
        self,
        model: Union[Mapping, nn.Module],
        tokenizer: Any,
        checkpointer: Optional[Mapping] = None,
        device: str = "cpu",
        dtype: str = "fp32",
        max_seq_len: Optional[int] = None,
    ) -> None:
        self.device = utils.get_device(device=device)
        self.dtype = training.get_dtype(dtype, device=self.device)
        self.tokenizer = _build(tokenizer)
        if isinstance(model, nn.Module):
            self.model = model.to(device=self.device, dtype=self.dtype)
        else:
            with training.set_default_dtype(self.dtype), self.device:
                self.model = _build(model)
        if checkpointer is not None:
            state_dict = _build(checkpointer).load_checkpoint()[training.MODEL_KEY]
            self.model.load_state_dict(state_dict)
        self.model.eval().requires_grad_(False)
        self.max_seq_len = max_seq_len or getattr(self.model, "max_seq_len", None)
        self.pad_id = getattr(self.tokenizer, "pad_id", 0) or 0
        self.num_truncated = 0

    def tokenize(self, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
        """Prompt tokens and response tokens, exactly as the RAO dataset tokenizes them; the end of the response
        is cut first when the two exceed ``max_seq_len``."""
        messages = [Message(role=m["role"], content=m["content"], masked=True) for m in prompt]
        prompt_tokens, (response_tokens,) = tokenize_prompt_and_responses(self.tokenizer, messages, [response])
        if self.max_seq_len is not None and len(prompt_tokens) + len(response_tokens) > self.max_seq_len:
            self.num_truncated += 1
            prompt_tokens = prompt_tokens[: self.max_seq_len - 1]
            response_tokens = response_tokens[: self.max_seq_len - len(prompt_tokens)]
        return prompt_tokens, response_tokens

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """One forward pass; the reward is the head's output at each response's last token. Consecutive
        responses to the same prompt share one copy of it (packed, prefix-shared rows, no padding but the
        rows' tails)."""
        samples: list[dict] = []
        for prompt, response in zip(prompts, responses):
            prompt_tokens, response_tokens = self.tokenize(prompt, response)
            if samples and samples[-1]["prompt_tokens"] == prompt_tokens:
                samples[-1]["response_tokens"].append(response_tokens)
            else:
                samples.append({"prompt_tokens": prompt_tokens, "response_tokens": [response_tokens], "rewards": []})
        for sample in samples:
            sample["rewards"] = [0.0] * len(sample["response_tokens"])
        collate = packed_collator(pad_id=self.pad_id, device=self.device, longest=longest_sequence(samples),
                                  model_max_seq_len=self.model.max_seq_len)
        batch = collate(samples)
        batch = {key: value.to(self.device) for key, value in batch.items()}
        outputs = self.model(batch["tokens"], **model_inputs(batch, self.model))
        return last_token_scores(outputs, batch["last_positions"]).cpu().tolist()


def prompt_for_rule(prompt: Prompt) -> Union[str, Prompt]:
    """What a rule-based reward sees: the text of a single user message, else the message list."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return prompt


class CallableScorer:
    """Turns a ``(prompt, response) -> float`` callable into a scorer (one call per response)."""

    def __init__(self, reward: Callable[[Any, str], float]) -> None:
        self.reward = reward

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return [float(self.reward(prompt_for_rule(p), r)) for p, r in zip(prompts, responses)]


def python_reward(function: str) -> CallableScorer:
    """Config builder for a rule-based reward given by dotted path::

        scorer:
          _component_: rao_tune.rewards.python_reward
          function: my_package.rewards.exact_match   # def exact_match(prompt, response) -> float
    """
    module_path, _, name = function.rpartition(".")
    if not module_path:
        raise ValueError(f"function must be a dotted path such as my_package.rewards.exact_match, got {function!r}")
    return CallableScorer(getattr(importlib.import_module(module_path), name))


def as_scorer(scorer: Any) -> Any:
    """Accept a scorer (has ``score``) or a ``(prompt, response) -> float`` callable (wrapped)."""
    if hasattr(scorer, "score"):
        return scorer
    if callable(scorer):
        return CallableScorer(scorer)
    raise TypeError(
        f"a scorer needs score(prompts, responses) or __call__(prompt, response); got {type(scorer).__name__}"
    )


# --- Example rule-based rewards ---------------------------------------------------------------------------------


def word_count(prompt: Any, response: str) -> float:
    """The number of words of the response: a deliberately naive length reward, handy for tests and demos."""
    return float(len(response.split()))


class KeywordReward:
    """``weight`` times the number of ``keywords`` the response contains (case-insensitive), minus
    ``length_penalty`` per word. Given by ``_component_: rao_tune.rewards.KeywordReward`` with ``keywords: [...]``."""

    def __init__(self, keywords: Sequence[str], weight: float = 1.0, length_penalty: float = 0.0) -> None:
        self.keywords = [keyword.lower() for keyword in keywords]
        self.weight = weight
        self.length_penalty = length_penalty

    def __call__(self, prompt: Any, response: str) -> float:
        text = response.lower()
        hits = sum(keyword in text for keyword in self.keywords)
        return self.weight * hits - self.length_penalty * len(response.split())
