"""Instructions with verifiable constraints (IFEval-like) on real text, and the checker that scores answers.

A prompt is a writing request about a topic followed by one to three constraints, each written by a fixed
sentence template (``Answer in 20 to 40 words.``, ``Do not use any commas.``, ...). The checker reads the
constraints back from the prompt's text with the same templates, so the reward is a pure function of
``(prompt, response)``: the fraction of the prompt's constraints the response satisfies. It plugs into
annotation as a rule-based reward (``rao_tune.rewards.python_reward`` with
``function: rao_tune.real.instructions.instruction_reward``).

Splits are disjoint by topic: training, validation and test prompts are about different topics, so no
topic x constraint combination and no prompt is shared between them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

TOPICS: tuple[str, ...] = (
    "the ocean", "coffee", "a rainy day", "bicycles", "libraries", "the moon", "gardening", "trains", "winter",
    "honeybees", "volcanoes", "chess", "bread baking", "the desert", "kites", "lighthouses", "autumn leaves",
    "penguins", "the night sky", "mountains", "city parks", "old maps", "music lessons", "a quiet morning",
    "recycling", "rivers", "owls", "camping", "the first snow", "teamwork", "a busy market", "sailing boats",
    "dinosaurs", "tea", "thunderstorms", "forests", "museums", "friendship", "robots", "the post office",
    "apples", "clocks", "bridges", "elephants", "painting", "the wind", "islands", "a birthday party",
    "fireflies", "sunflowers", "running shoes", "the library card", "pizza", "sleep", "rainbows", "the harbor",
)  # fmt: skip
REQUESTS: tuple[str, ...] = (
    "Write a short note about {topic}.", "Describe {topic}.", "Tell me something interesting about {topic}.",
    "Explain {topic} to a child.", "Give some advice related to {topic}.", "Write a short text about {topic}.",
)  # fmt: skip
_KEYWORDS = ("light", "blue", "small", "quiet", "friend", "water", "morning", "warm", "green", "story")
_ENDINGS = ("Thank you for reading.", "That is all.", "Have a nice day.", "The end.")
_STARTS = ("Today", "Imagine", "Yes", "First", "Here")
_JSON_KEYS = ("title", "summary", "mood", "color", "reason", "place")


@dataclass(frozen=True)
class Constraint:
    """One constraint kind: how its sentence is written from parameters, read back from a prompt, and checked."""

    kind: str
    pattern: str  # the sentence with {name} placeholders
    draw: Callable[[random.Random], dict]
    check: Callable[[str, dict], bool]

    def sentence(self, params: dict) -> str:
        return self.pattern.format(**params)

    def regex(self) -> re.Pattern:
        parts = re.split(r"(\{\w+\})", self.pattern)
        body = "".join(f"(?P<{p[1:-1]}>.+?)" if p.startswith("{") else re.escape(p) for p in parts)
        return re.compile(body)


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if _words(s)]


def _json_object(text: str) -> Optional[dict]:
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.S)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _has_json_keys(text: str, keys: list[str]) -> bool:
    value = _json_object(text)
    return value is not None and sorted(value) == sorted(keys)


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def _word_range(rng):
    low = rng.choice((10, 20, 30, 40))
    return {"low": low, "high": low + rng.choice((15, 20, 30))}


CONSTRAINTS: dict[str, Constraint] = {c.kind: c for c in (
    Constraint("word_count", "Answer in {low} to {high} words.", _word_range,
               lambda r, p: int(p["low"]) <= len(_words(r)) <= int(p["high"])),
    Constraint("bullets", "Use exactly {n} bullet points starting with '- '.", lambda rng: {"n": rng.randint(2, 5)},
               lambda r, p: sum(line.startswith(("- ", "* ")) for line in _lines(r)) == int(p["n"])),
    Constraint("numbered", "Give exactly {n} numbered items (1., 2., ...).", lambda rng: {"n": rng.randint(2, 5)},
               lambda r, p: sum(bool(re.match(r"\d+[.)]\s", line)) for line in _lines(r)) == int(p["n"])),
    Constraint("include", "Use the word '{word}'.", lambda rng: {"word": rng.choice(_KEYWORDS)},
               lambda r, p: _contains_word(r, p["word"])),
    Constraint("exclude", "Do not use the word '{word}'.", lambda rng: {"word": rng.choice(_KEYWORDS)},
               lambda r, p: not _contains_word(r, p["word"])),
    Constraint("lowercase", "Write only in lowercase letters.", lambda rng: {},
               lambda r, p: bool(re.search(r"[a-z]", r)) and r == r.lower()),
    Constraint("ends_with", "End with the exact phrase '{phrase}'", lambda rng: {"phrase": rng.choice(_ENDINGS)},
               lambda r, p: r.strip().endswith(p["phrase"])),
    Constraint("starts_with", "Start with the word '{word}'.", lambda rng: {"word": rng.choice(_STARTS)},
               lambda r, p: (_words(r)[:1] or [""])[0].lower() == p["word"].lower()),
    Constraint("no_commas", "Do not use any commas.", lambda rng: {}, lambda r, p: "," not in r),
    Constraint("json", "Answer with a JSON object whose only keys are {keys}.",
               lambda rng: {"keys": " and ".join(f'"{k}"' for k in sorted(rng.sample(_JSON_KEYS, 2)))},
               lambda r, p: _has_json_keys(r, re.findall(r'"(\w+)"', p["keys"]))),
    Constraint("sentences", "Write exactly {n} sentences.", lambda rng: {"n": rng.randint(2, 4)},
               lambda r, p: len(_sentences(r)) == int(p["n"])),
    Constraint("paragraphs", "Write exactly {n} paragraphs separated by a blank line.",
               lambda rng: {"n": rng.randint(2, 3)},
               lambda r, p: len([b for b in re.split(r"\n\s*\n", r.strip()) if b.strip()]) == int(p["n"])),
)}
# Kinds that cannot hold together (a JSON object has commas between keys and no bullets, ...).
_CLASHES = {
    frozenset(pair) for pair in [
        ("bullets", "numbered"), ("bullets", "sentences"), ("numbered", "sentences"), ("bullets", "paragraphs"),
        ("numbered", "paragraphs"), ("json", "bullets"), ("json", "numbered"), ("json", "sentences"),
        ("json", "paragraphs"), ("json", "ends_with"), ("json", "starts_with"), ("json", "no_commas"),
        ("json", "lowercase"), ("lowercase", "starts_with"), ("lowercase", "ends_with"), ("include", "exclude"),
        ("sentences", "paragraphs"),
    ]
}


def _compatible(kinds: list[str]) -> bool:
    return all(frozenset((a, b)) not in _CLASHES for i, a in enumerate(kinds) for b in kinds[i + 1:])


def parse_constraints(prompt: str) -> list[tuple[Constraint, dict]]:
    """The constraints a prompt states, read back with each kind's sentence template, in the prompt's order."""
    found = []
    for constraint in CONSTRAINTS.values():
        for match in constraint.regex().finditer(prompt):
            found.append((match.start(), constraint, match.groupdict()))
    return [(constraint, params) for _, constraint, params in sorted(found, key=lambda item: item[0])]


def constraint_results(prompt: str, response: str) -> list[bool]:
    """Whether ``response`` satisfies each constraint of ``prompt``, in the prompt's order."""
    constraints = parse_constraints(prompt)
    if not constraints:
        raise ValueError(f"no verifiable constraint in prompt {prompt!r}")
    return [constraint.check(response, params) for constraint, params in constraints]


def instruction_reward(prompt, response: str) -> float:
    """The fraction of the prompt's constraints that ``response`` satisfies, in [0, 1] (a rule-based reward:
    ``prompt`` is the user message's text, or a message list whose last user message is read)."""
    if not isinstance(prompt, str):
        prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
    results = constraint_results(prompt, response)
    return sum(results) / len(results)


def make_prompt(rng: random.Random, topic: str) -> str:
    """One request about ``topic`` with one to three compatible constraints of distinct kinds."""
    while True:
        kinds = rng.sample(sorted(CONSTRAINTS), rng.randint(1, 3))
        if _compatible(kinds):
            break
    sentences = [CONSTRAINTS[kind].sentence(CONSTRAINTS[kind].draw(rng)) for kind in kinds]
    return " ".join([rng.choice(REQUESTS).format(topic=topic), *sentences])


def split_topics(seed: int = 0, fractions: tuple[float, float] = (0.6, 0.2)) -> dict[str, list[str]]:
    """Topics dealt to train / validation / test without overlap (a seeded shuffle)."""
    topics = list(TOPICS)
    random.Random(seed).shuffle(topics)
    n_train, n_val = round(fractions[0] * len(topics)), round(fractions[1] * len(topics))
    return {"train": topics[:n_train], "validation": topics[n_train:n_train + n_val], "test": topics[n_train + n_val:]}


def instruction_prompts(sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """``sizes[split]`` distinct prompts per split, each split on its own topics (see :func:`split_topics`)."""
    topics = split_topics(seed)
    prompts = {}
    for index, (split, size) in enumerate(sizes.items()):
        rng, chosen = random.Random(f"{seed}-{split}"), []
        seen = set()
        for _ in range(100 * size):
            if len(chosen) == size:
                break
            prompt = make_prompt(rng, rng.choice(topics[split]))
            if prompt not in seen:
                seen.add(prompt)
                chosen.append(prompt)
        if len(chosen) < size:
            raise ValueError(f"only {len(chosen)} distinct {split} prompts could be drawn, {size} asked")
        prompts[split] = chosen
    return prompts
