"""Batches of prompts with a varying number of responses, in two layouts that yield the same log-probs.

- :func:`collate_reward_batch` (padded): one right-padded row ``prompt + response`` per response, so a prompt
  with k responses is processed k times and every row is as long as the longest.
- :func:`collate_packed_batch` (packed, prefix-shared): each prompt once, followed by its k responses; a
  response attends to its own prompt and to itself only, and its positions continue from the end of its
  prompt. Several prompts share a row up to a token budget; only the row's tail is padded.

Both describe what to score the same way, so the log-prob code never looks at the layout. Position ``i`` of a
row predicts the token at ``i + 1`` of the same sequence; the scored pairs are listed flat:

    logit_positions [T]   flat index (row * S + column) of the position whose next-token distribution is read
    target_tokens   [T]   the token whose log-prob is read there
    target_segments [T]   n in [0, N) for a token of response n; N + b for a token of prompt b after t0

and per response (N of them, flattened over the B prompts): ``rewards``, ``prompt_ids`` (which prompt),
``response_lengths``, ``last_positions`` (flat index of the response's last token, where a reward model reads
its score). ``useful_tokens`` counts every prompt once and every response, without padding. The prompts alone,
for a model that reads only them (DRO's value network): ``prompt_rows [B, P]`` (right-padded; causal attention
makes the padding invisible) and ``prompt_last_positions [N]`` (flat index of each response's prompt's last token).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class _BatchBuilder:
    """Collects rows of tokens and the scored (position, target, segment) triples of either layout."""

    def __init__(self, samples: Sequence[dict]) -> None:
        if any(not sample["response_tokens"] for sample in samples):
            raise ValueError("every prompt of a batch needs at least one response")
        self.samples = samples
        self.rows: list[dict[str, list[int]]] = []
        self.num_responses = sum(len(sample["response_tokens"]) for sample in samples)
        # (row, column, target token, segment) per scored token; (row, column) of each response's last token.
        self.targets: list[tuple[int, int, int, int]] = []
        self.last_token = [(0, 0)] * self.num_responses

    def new_row(self) -> int:
        self.rows.append({"tokens": [], "input_pos": [], "group_ids": [], "segment_ids": []})
        return len(self.rows) - 1

    def append(self, row: int, tokens: list[int], first_position: int, group: int, segment: int) -> int:
        """Append a piece to ``row``; returns the column where it starts."""
        fields = self.rows[row]
        start = len(fields["tokens"])
        fields["tokens"] += tokens
        fields["input_pos"] += range(first_position, first_position + len(tokens))
        fields["group_ids"] += [group] * len(tokens)
        fields["segment_ids"] += [segment] * len(tokens)
        return start

    def score_prompt(self, row: int, start: int, prompt: list[int], prompt_index: int) -> None:
        """Targets log pi(x - t0 | t0): each prompt token after the first, from the position before it."""
        segment = self.num_responses + prompt_index
        self.targets += [(row, start + i, prompt[i + 1], segment) for i in range(len(prompt) - 1)]

    def score_response(self, row: int, prompt_end: int, start: int, response: list[int], response_index: int) -> None:
        """Targets log pi(y | x): the first response token is predicted by the prompt's last position
        ``prompt_end``, every later one by the response position before it."""
        predictors = [prompt_end] + [start + i for i in range(len(response) - 1)]
        self.targets += [(row, column, token, response_index) for column, token in zip(predictors, response)]
        self.last_token[response_index] = (row, start + len(response) - 1)

    def build(self, pad_id: int, packed: bool, width: Optional[int] = None) -> dict[str, torch.Tensor]:
        width = width or max(len(row["tokens"]) for row in self.rows)

        def padded(field: str, fill: int) -> torch.Tensor:
            out = torch.full((len(self.rows), width), fill, dtype=torch.long)
            for index, row in enumerate(self.rows):
                out[index, : len(row[field])] = torch.tensor(row[field], dtype=torch.long)
            return out

        rows, columns, target_tokens, segments = (torch.tensor(values, dtype=torch.long) for values in zip(*self.targets))
        last_rows, last_columns = (torch.tensor(values, dtype=torch.long) for values in zip(*self.last_token))
        rewards, prompt_ids, response_lengths = [], [], []
        for prompt_index, sample in enumerate(self.samples):
            rewards += sample["rewards"]
            prompt_ids += [prompt_index] * len(sample["response_tokens"])
            response_lengths += [len(response) for response in sample["response_tokens"]]
        prompts = [sample["prompt_tokens"] for sample in self.samples]
        prompt_width = max(len(prompt) for prompt in prompts)
        prompt_rows = torch.full((len(prompts), prompt_width), pad_id, dtype=torch.long)
        for index, prompt in enumerate(prompts):
            prompt_rows[index, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        prompt_last = torch.tensor([index * prompt_width + len(prompt) - 1 for index, prompt in enumerate(prompts)])
        prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
        batch = {
            "tokens": padded("tokens", pad_id),
            "logit_positions": rows * width + columns,
            "target_tokens": target_tokens,
            "target_segments": segments,
            "last_positions": last_rows * width + last_columns,
            "rewards": torch.tensor(rewards, dtype=torch.float32),
            "prompt_ids": prompt_ids,
            "response_lengths": torch.tensor(response_lengths, dtype=torch.long),
            "useful_tokens": torch.tensor(useful_tokens(self.samples)),
            "prompt_rows": prompt_rows,
            "prompt_last_positions": prompt_last[prompt_ids],
        }
        if packed:
            # Padding gets its own group (-1), so it attends only to padding and never to real tokens.
            batch.update(input_pos=padded("input_pos", 0), group_ids=padded("group_ids", -1),
                         segment_ids=padded("segment_ids", -1))
        for name in ("reference_logps", "reference_prompt_logps"):
            if all(name in sample for sample in self.samples):
                batch[name] = _reference_column(self.samples, name)
        return batch


def useful_tokens(samples: Sequence[dict]) -> int:
    """The tokens a batch is about: every prompt once and every response, no padding."""
    return sum(len(s["prompt_tokens"]) + sum(len(r) for r in s["response_tokens"]) for s in samples)


def longest_sequence(samples: Sequence[dict]) -> int:
    """The longest prompt + response among ``samples``: what a packed row must at least hold."""
    return max(len(s["prompt_tokens"]) + max(len(r) for r in s["response_tokens"]) for s in samples)


def _reference_column(samples: Sequence[dict], name: str) -> torch.Tensor:
    """Precomputed reference log-probs carried by the samples, one per response (a prompt's is repeated)."""
    values = []
    for sample in samples:
        value = sample[name]
        values += value if isinstance(value, list) else [value] * len(sample["response_tokens"])
    return torch.tensor(values, dtype=torch.float32)


def collate_reward_batch(samples: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Flatten B prompts with k_i responses each into N = sum k_i right-padded rows ``prompt + response``.

    Besides the scored pairs (module docstring): ``tokens [N, S]`` and ``sequence_lengths [N]``. A prompt's
    own tokens are scored once, in the row of its first response (causal attention makes every copy equal).
    """
    builder = _BatchBuilder(samples)
    response_index = 0
    for prompt_index, sample in enumerate(samples):
        prompt = sample["prompt_tokens"]
        for k, response in enumerate(sample["response_tokens"]):
            row = builder.new_row()
            builder.append(row, prompt, 0, group=0, segment=0)
            if k == 0:
                builder.score_prompt(row, 0, prompt, prompt_index)
            start = builder.append(row, response, len(prompt), group=0, segment=1)
            builder.score_response(row, len(prompt) - 1, start, response, response_index)
            response_index += 1
    batch = builder.build(pad_id, packed=False)
    batch["sequence_lengths"] = torch.tensor([len(row["tokens"]) for row in builder.rows], dtype=torch.long)
    return batch


def collate_packed_batch(
    samples: Sequence[dict], pad_id: int = 0, max_row_tokens: Optional[int] = None, fixed_width: bool = False,
    score_prompts: bool = True,
) -> dict[str, torch.Tensor]:
    """Pack B prompts, each followed once by its k_i responses, into rows of at most ``max_row_tokens`` tokens
    (None: one row); ``fixed_width`` pads every row to exactly ``max_row_tokens``, so that shapes repeat (a
    compiled flex attention then compiles once). Besides the scored pairs (module docstring), per token of
    ``tokens [R, S]``:

        input_pos   [R, S]  position ids: a prompt counts from 0, each of its responses from the prompt's length
        group_ids   [R, S]  which prompt group the token belongs to (-1: padding)
        segment_ids [R, S]  0 for prompt tokens, n + 1 for tokens of response n (-1: padding)

    from which :func:`rao_tune.training.attention.prefix_sharing_mask` builds the attention mask. Groups are
    placed longest first, each into the first row with room. A prompt whose responses do not fit one row with
    it is split into several groups that repeat the prompt (its own tokens are scored once, in the first of
    these groups to be placed). ``score_prompts=False`` leaves the prompts' own tokens out of the scored pairs
    (PPO reads only the responses' log-probs).
    """
    builder = _BatchBuilder(samples)
    groups = []  # (prompt index, [(response index, response tokens), ...])
    response_index = 0
    for prompt_index, sample in enumerate(samples):
        prompt = sample["prompt_tokens"]
        group: list[tuple[int, list[int]]] = []
        for response in sample["response_tokens"]:
            if max_row_tokens is not None and len(prompt) + len(response) > max_row_tokens:
                raise ValueError(
                    f"a prompt of {len(prompt)} tokens with a response of {len(response)} does not fit a packed row "
                    f"of max_row_tokens={max_row_tokens}: raise it or lower the dataset's max_seq_len"
                )
            group_length = len(prompt) + sum(len(r) for _, r in group) + len(response)
            if group and max_row_tokens is not None and group_length > max_row_tokens:
                groups.append((prompt_index, group))
                group = []
            group.append((response_index, response))
            response_index += 1
        groups.append((prompt_index, group))

    def group_length(group: tuple[int, list]) -> int:
        return len(samples[group[0]]["prompt_tokens"]) + sum(len(r) for _, r in group[1])

    row_lengths: list[int] = []
    prompt_scored: set[int] = set()
    for group_id, (prompt_index, members) in sorted(enumerate(groups), key=lambda item: -group_length(item[1])):
        length = group_length((prompt_index, members))
        row = next((r for r, used in enumerate(row_lengths)
                    if max_row_tokens is None or used + length <= max_row_tokens), None)
        if row is None:
            row = builder.new_row()
            row_lengths.append(0)
        row_lengths[row] += length
        prompt = samples[prompt_index]["prompt_tokens"]
        prompt_start = builder.append(row, prompt, 0, group=group_id, segment=0)
        if score_prompts and prompt_index not in prompt_scored:
            builder.score_prompt(row, prompt_start, prompt, prompt_index)
            prompt_scored.add(prompt_index)
        for index, response in members:
            start = builder.append(row, response, len(prompt), group=group_id, segment=index + 1)
            builder.score_response(row, prompt_start + len(prompt) - 1, start, response, index)
    if fixed_width and max_row_tokens is None:
        raise ValueError("fixed_width needs max_row_tokens")
    return builder.build(pad_id, packed=True, width=max_row_tokens if fixed_width else None)
