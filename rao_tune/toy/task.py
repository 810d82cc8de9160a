"""The toy task: prompts whose right answer is a list of items, and a true, rule-based reward that grades how
right an answer is. It is the ground-truth judge of the toy pipeline and the study, and the data of the tests.

Three families of prompts: ``count from 5 to 14``, ``repeat the word moon 9 times``, ``reverse: cat sun ...``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from rao_tune.files import write_jsonl

_WORDS: tuple[str, ...] = (
    "apple", "banana", "cat", "dog", "egg", "fish", "grape", "hat", "ink", "jam",
    "kite", "lemon", "moon", "nut", "owl", "pear", "queen", "rose", "sun", "tree",
)  # fmt: skip


def _answer_score(answer: list[str], target: list[str]) -> float:
    """Fraction of positions answered right, over the longer of answer and target: missing and extra items
    both cost, so the score is graded in [0, 1] and 1 only for the exact answer."""
    matches = sum(given == wanted for given, wanted in zip(answer, target))
    return matches / max(len(answer), len(target))


# Answers are lists of 6 to 14 items (about 7 to 15 tokens): long enough that a sequence log-ratio sums over many
# tokens and that the graded reward has fine steps, as the paper's responses of hundreds of tokens scored 1-10 are.
_MIN_ITEMS, _MAX_ITEMS = 6, 14


def _count_task(rng: random.Random) -> tuple[str, list[str], Callable[[int], str]]:
    start, n = rng.randint(1, 20), rng.randint(_MIN_ITEMS, _MAX_ITEMS)
    target = [str(i) for i in range(start, start + n)]
    # Extra items keep on counting past the end.
    return f"count from {start} to {start + n - 1}", target, lambda i: str(start + n + i)


def _repeat_task(rng: random.Random) -> tuple[str, list[str], Callable[[int], str]]:
    word = rng.choice(_WORDS)
    times = rng.randint(_MIN_ITEMS, _MAX_ITEMS)
    return f"repeat the word {word} {times} times", [word] * times, lambda i: word


def _reverse_task(rng: random.Random) -> tuple[str, list[str], Callable[[int], str]]:
    words = rng.sample(_WORDS, rng.randint(_MIN_ITEMS, 10))
    return f"reverse: {' '.join(words)}", words[::-1], lambda i: rng.choice(_WORDS)


_TASKS = (_count_task, _repeat_task, _reverse_task)


_COUNT = re.compile(r"count from (\d+) to (\d+)")
_REPEAT = re.compile(r"repeat the word (\S+) (\d+) times")
_REVERSE = re.compile(r"reverse: (.+)")


def task_target(prompt: str) -> list[str]:
    """The right answer of a synthetic-task prompt, as a list of items."""
    if match := _COUNT.fullmatch(prompt):
        return [str(i) for i in range(int(match.group(1)), int(match.group(2)) + 1)]
    if match := _REPEAT.fullmatch(prompt):
        return [match.group(1)] * int(match.group(2))
    if match := _REVERSE.fullmatch(prompt):
        return match.group(1).split()[::-1]
    raise ValueError(f"not a prompt of the synthetic task: {prompt!r}")


def true_reward(prompt: str, response: str) -> float:
    """The synthetic task's rule-based reward in [0, 1]: the fraction of positions answered right (graded: a
    partly right answer scores between 0 and 1). A ``(prompt, response) -> float`` scorer for
    ``rao_tune.rewards.python_reward``."""
    return _answer_score(response.split(), task_target(prompt))


def task_prompts(num_prompts: int, seed: int) -> list[str]:
    """``num_prompts`` prompts of the synthetic task drawn from ``seed``."""
    rng = random.Random(seed)
    return [rng.choice(_TASKS)(rng)[0] for _ in range(num_prompts)]


def disjoint_task_prompts(sizes: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Prompts for each split (``{"train": n, ...}``, in that order), drawn without replacement from one stream:
    no prompt appears twice, within a split or across splits, so a held-out prompt was never trained on."""
    rng = random.Random(seed)
    total, drawn, seen, draws = sum(sizes.values()), [], set(), 0
    while len(drawn) < total:
        if draws == 100 * total:
            raise ValueError(f"the task gave fewer than {total} distinct prompts in {draws} draws")
        prompt, draws = rng.choice(_TASKS)(rng)[0], draws + 1
        if prompt not in seen:
            seen.add(prompt)
            drawn.append(prompt)
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split], start = drawn[start:start + size], start + size
    return splits


def _wrong_item(rng: random.Random, right: str) -> str:
    pool = [str(i) for i in range(1, 40)] if right.isdigit() else list(_WORDS)
    return rng.choice([item for item in pool if item != right])


def _corrupt(rng: random.Random, target: list[str], num_errors: int, extra_item: Callable[[int], str]) -> list[str]:
    """``target`` with ``num_errors`` mistakes of one kind: wrong items, a cut-off end, or too many items."""
    if num_errors == 0:
        return list(target)
    kinds = ["substitute", "extend"] + (["truncate"] if num_errors < len(target) else [])
    kind = rng.choice(kinds)
    if kind == "truncate":
        return target[: len(target) - num_errors]
    if kind == "extend":
        return target + [extra_item(i) for i in range(num_errors)]
    answer = list(target)
    for position in rng.sample(range(len(target)), num_errors):
        answer[position] = _wrong_item(rng, target[position])
    return answer


def reward_rows(
    num_prompts: int = 64, responses_per_prompt: tuple[int, int] = (2, 4), seed: int = 0
) -> list[dict[str, Any]]:
    """Rows of the synthetic task in the native layout ``{"prompt", "responses", "rewards"}``.

    Each response of a prompt has a different number of mistakes, so rewards differ within a prompt, and the
    number of responses varies between rows on purpose.
    """
    low, high = responses_per_prompt
    if not 1 <= low <= high:
        raise ValueError(f"responses_per_prompt must be (low, high) with 1 <= low <= high, got {responses_per_prompt}")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        prompt, target, extra_item = rng.choice(_TASKS)(rng)
        # Targets have >= 6 items, so at least 7 distinct mistake counts exist; more responses reuse counts.
        mistake_counts = list(range(len(target) + 1))
        num_responses = rng.randint(low, high)
        if num_responses <= len(mistake_counts):
            chosen_counts = rng.sample(mistake_counts, num_responses)
        else:
            chosen_counts = [rng.choice(mistake_counts) for _ in range(num_responses)]
        answers = [_corrupt(rng, target, count, extra_item) for count in chosen_counts]
        rows.append(
            {
                "prompt": prompt,
                "responses": [" ".join(answer) for answer in answers],
                "rewards": [round(_answer_score(answer, target), 4) for answer in answers],
            }
        )
    return rows


def build_reward_data(
    out_path: Path, *, num_prompts: int = 64, responses_per_prompt: tuple[int, int] = (2, 4), seed: int = 0
) -> None:
    """Write ``reward_rows(...)`` as JSON lines to ``out_path``."""
    write_jsonl(Path(out_path), reward_rows(num_prompts, responses_per_prompt, seed))


MARKER_WORD = "moon"


def marker_preference_rows(num_prompts: int, seed: int = 0, marker: str = MARKER_WORD) -> list[dict[str, Any]]:
    """A preference set a tiny reward model can learn: per prompt two answers with random mistakes, the
    preferred one (reward 1) carries ``marker`` at a random position and the other (reward 0) never does.
    The order of the two responses is random, so position gives nothing away."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_prompts):
        prompt, target, extra_item = rng.choice(_TASKS)(rng)
        plain = [_corrupt(rng, target, rng.randint(0, 2), extra_item) for _ in range(2)]
        plain = [[word if word != marker else "sun" for word in answer] for answer in plain]
        marked = list(plain[0])
        marked.insert(rng.randint(0, len(marked)), marker)
        responses, rewards = [" ".join(marked), " ".join(plain[1])], [1.0, 0.0]
        if rng.random() < 0.5:
            responses, rewards = responses[::-1], rewards[::-1]
        rows.append({"prompt": prompt, "responses": responses, "rewards": rewards})
    return rows


def demonstration_rows(
    num_prompts: int, seed: int = 0, mistakes: tuple[int, int] = (1, 3), exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Imperfect demonstrations for SFT, one per prompt: the right answer with ``mistakes`` (low, high) errors of
    one kind, so the SFT model answers roughly and alignment has room to improve it. Prompts in ``exclude``
    (held-out ones) are never demonstrated."""
    rng = random.Random(seed)
    excluded = set(exclude)
    rows = []
    while len(rows) < num_prompts:
        prompt, target, extra_item = rng.choice(_TASKS)(rng)
        if prompt in excluded:
            continue
        answer = _corrupt(rng, target, rng.randint(*mistakes), extra_item)
        rows.append({"prompt": prompt, "responses": [" ".join(answer)], "rewards": [_answer_score(answer, target)]})
    return rows


def sft_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reward rows as SFT conversations ``{"messages": [user, assistant]}`` with each prompt's best response."""
    conversations = []
    for row in rows:
        best = max(range(len(row["rewards"])), key=row["rewards"].__getitem__)
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["responses"][best]}]
        conversations.append({"messages": messages})
    return conversations


def build_tiny_eval_tasks(out_dir: Path, num_questions: int = 12, seed: int = 0) -> Path:
    """Two local lm-eval tasks on the synthetic task, for evaluation without the hub: ``tiny_choice``
    (multiple choice: the right answer among three of the task's answers) and ``tiny_answer`` (generate until a
    newline, exact match). Returns the folder to give lm-eval as ``include_path``."""
    out_dir = Path(out_dir).resolve()  # the task files name their data by absolute path
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions = []
    for _ in range(num_questions):
        prompt, target, extra_item = rng.choice(_TASKS)(rng)
        wrong = [" ".join(_corrupt(rng, target, errors, extra_item)) for errors in (1, 2)]
        choices = [" ".join(target), *wrong]
        rng.shuffle(choices)
        questions.append({"question": prompt, "choices": choices, "answer": choices.index(" ".join(target)),
                          "target": " ".join(target)})
    write_jsonl(out_dir / "tiny_questions.jsonl", questions)
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out_dir / 'tiny_questions.jsonl'}\ntest_split: test\n"
    (out_dir / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n" + data + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n"
    )
    (out_dir / "tiny_answer.yaml").write_text(
        "task: tiny_answer\n" + data + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{target}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 32\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    return out_dir


def tiny_corpus(seed: int = 0) -> list[str]:
    """Text covering the task's vocabulary and the chat roles, for training the tiny tokenizer."""
    rows = reward_rows(num_prompts=512, responses_per_prompt=(4, 4), seed=seed)
    corpus = [" ".join(_WORDS), " ".join(str(i) for i in range(1, 40)), "system user assistant ipython"]
    for row in rows:
        corpus.append(row["prompt"])
        corpus.extend(row["responses"])
    return corpus
