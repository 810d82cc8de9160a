"""Answers for the LLM-judge benchmarks: AlpacaEval's ``model_outputs`` and MT-Bench's model answers.

Both benchmarks only need the model's answers in their own file formats; the judging (GPT-4) happens in their
own tools. Here:

* readers for the prompt files: AlpacaEval's evaluation set (``alpaca_eval.json``: a JSON list, or JSON lines,
  of objects with ``instruction`` and optionally ``dataset``) and MT-Bench's questions (FastChat's
  ``question.jsonl``: ``question_id``, ``category``, ``turns``); a bad row stops with the file, row and field;
* prompt rendering with the model's own torchtune tokenizer and chat format, exactly as training renders a
  prompt (the conversation plus an empty assistant message, without end tokens, so it ends with the assistant
  header), whichever backend generates;
* answering with any generation backend of :mod:`rao_tune.eval.generation` (torchtune's KV-cache generation or
  vllm; token ids in, new token ids out);
* multi-turn answering (MT-Bench's second turn sees the first question and the model's own first answer);
* writers: AlpacaEval's ``model_outputs.json`` (``instruction``, ``output``, ``generator``, ``dataset``) and
  MT-Bench answer lines as FastChat's ``gen_model_answer`` writes them (``question_id``, ``answer_id``,
  ``model_id``, ``choices: [{"index": 0, "turns": [...]}]``, ``tstamp``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torchtune.data import Message

from rao_tune.data.reward_dataset import tokenize_prompt
from rao_tune.eval.generation import GenerationBackend, GenerationStats, PathLike, decode_text
from rao_tune.files import write_atomically

# --- Prompt files ------------------------------------------------------------------------------------------------


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file, the row and the field."""


@dataclass(frozen=True)
class AlpacaEvalPrompt:
    instruction: str
    dataset: Optional[str] = None  # AlpacaEval's source subset (helpful_base, koala, ...), copied to the output


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: Union[int, str]
    category: str
    turns: tuple[str, ...]  # the user's messages, one per turn (two in MT-Bench)


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """The objects of a JSON list or a JSON-lines file, each with where it is (``row i`` or ``row i (line n)``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PromptFileError(f"{path}: cannot read the prompt file: {err}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}: not valid JSON ({err})") from None
        located = [(f"row {i}", row) for i, row in enumerate(rows)]
    else:
        located = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"row {len(located)} (line {line_number})"
            try:
                located.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{path}, {where}: not valid JSON ({err})") from None
    if not located:
        raise PromptFileError(f"{path}: no rows")
    for where, row in located:
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}, {where}: expected a JSON object, got {type(row).__name__}")
    return located


def _text_field(path: Path, where: str, row: dict, field: str, *, required: bool = True) -> Optional[str]:
    if field not in row or row[field] is None:
        if required:
            raise PromptFileError(f"{path}, {where}, field '{field}': missing")
        return None
    value = row[field]
    if not isinstance(value, str):
        raise PromptFileError(f"{path}, {where}, field '{field}': expected a string, got {type(value).__name__}")
    if required and not value.strip():
        raise PromptFileError(f"{path}, {where}, field '{field}': empty")
    return value


def read_alpaca_eval_prompts(path: PathLike) -> list[AlpacaEvalPrompt]:
    """AlpacaEval's evaluation set (e.g. ``alpaca_eval.json``), in file order. Other fields (the reference
    ``output`` and ``generator``) are ignored."""
    path = Path(path)
    return [
        AlpacaEvalPrompt(
            instruction=_text_field(path, where, row, "instruction"),
            dataset=_text_field(path, where, row, "dataset", required=False),
        )
        for where, row in _read_rows(path)
    ]


def read_mt_bench_questions(path: PathLike) -> list[MTBenchQuestion]:
    """MT-Bench questions (FastChat's ``question.jsonl``), in file order; ``question_id`` must be unique."""
    path = Path(path)
    questions: list[MTBenchQuestion] = []
    seen: dict[Union[int, str], str] = {}
    for where, row in _read_rows(path):
        question_id = row.get("question_id")
        if question_id is None:
            raise PromptFileError(f"{path}, {where}, field 'question_id': missing")
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
            raise PromptFileError(
                f"{path}, {where}, field 'question_id': expected an integer or a string, got {question_id!r}"
            )
        if question_id in seen:
            raise PromptFileError(
                f"{path}, {where}, field 'question_id': {question_id!r} repeats the one in {seen[question_id]}"
            )
        seen[question_id] = where
        category = _text_field(path, where, row, "category")
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise PromptFileError(f"{path}, {where}, field 'turns': expected a non-empty list of strings, got {turns!r}")
        for k, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise PromptFileError(f"{path}, {where}, field 'turns[{k}]': expected a non-empty string, got {turn!r}")
        questions.append(MTBenchQuestion(question_id=question_id, category=category, turns=tuple(turns)))
    return questions


# --- Output files ------------------------------------------------------------------------------------------------


def alpaca_eval_records(
    prompts: Sequence[AlpacaEvalPrompt], outputs: Sequence[str], generator: str
) -> list[dict[str, str]]:
    """AlpacaEval's ``model_outputs`` records, in prompt order (``dataset`` only where the prompt had one)."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    records = []
    for prompt, output in zip(prompts, outputs):
        record = {"instruction": prompt.instruction, "output": output, "generator": generator}
        if prompt.dataset is not None:
            record["dataset"] = prompt.dataset
        records.append(record)
    return records


def write_alpaca_eval_outputs(
    path: PathLike, prompts: Sequence[AlpacaEvalPrompt], outputs: Sequence[str], generator: str
) -> Path:
    """Write ``model_outputs.json`` (a JSON list), what ``alpaca_eval --model_outputs`` reads."""
    path = Path(path)
    records = alpaca_eval_records(prompts, outputs, generator)
    write_atomically(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return path


def _answer_id(model_id: str, question_id: Union[int, str], turns: Sequence[str]) -> str:
    # FastChat draws a random short uuid; a digest of the answer is as unique and keeps reruns byte-identical.
    digest = hashlib.sha256(json.dumps([model_id, question_id, list(turns)]).encode("utf-8")).hexdigest()
    return digest[:22]


def mt_bench_records(
    questions: Sequence[MTBenchQuestion],
    answers: Sequence[Sequence[str]],
    model_id: str,
    tstamp: Optional[float] = None,
) -> list[dict[str, Any]]:
    """MT-Bench answer records as FastChat's ``gen_model_answer`` writes them, in question order."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    tstamp = time.time() if tstamp is None else tstamp
    records = []
    for question, turns in zip(questions, answers):
        if len(turns) != len(question.turns):
            raise ValueError(f"question {question.question_id!r} has {len(question.turns)} turns but {len(turns)} answers")
        records.append(
            {
                "question_id": question.question_id,
                "answer_id": _answer_id(model_id, question.question_id, turns),
                "model_id": model_id,
                "choices": [{"index": 0, "turns": list(turns)}],
                "tstamp": tstamp,
            }
        )
    return records


def write_mt_bench_answers(
    path: PathLike, questions: Sequence[MTBenchQuestion], answers: Sequence[Sequence[str]], model_id: str
) -> Path:
    """Write the answers as JSON lines; FastChat expects them at ``data/mt_bench/model_answer/<model_id>.jsonl``."""
    path = Path(path)
    records = mt_bench_records(questions, answers, model_id)
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
    return path


def default_generator_name(checkpoint_dir: PathLike) -> str:
    """A model name from its checkpoint folder: ``.../llama3_8b_rao/epoch_2`` -> ``llama3_8b_rao_epoch_2``, any
    other folder its own name; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``-``
    (the name is also a file name for FastChat)."""
    folder = Path(os.path.normpath(str(checkpoint_dir)))
    name = folder.name
    if re.fullmatch(r"epoch_\d+", name) and folder.parent.name:
        name = f"{folder.parent.name}_{name}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "model"


# --- Rendering and decoding --------------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, conversation: Sequence[tuple[str, str]], system_prompt: Optional[str] = None) -> list[int]:
    """Token ids of ``conversation`` (``(role, text)`` pairs, ending with a user turn) in the tokenizer's chat
    format, up to and including the assistant header: the prompt as training renders it."""
    messages = [Message(role="system", content=system_prompt, masked=True)] if system_prompt else []
    messages += [Message(role=role, content=text, masked=True) for role, text in conversation]
    return tokenize_prompt(tokenizer, messages)


# --- Answering ---------------------------------------------------------------------------------------------------


def _generate_texts(backend: GenerationBackend, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                    stats: Optional[GenerationStats], desc: str) -> list[str]:
    start = time.perf_counter()
    new_tokens = backend.generate(prompts, max_new_tokens=max_new_tokens, desc=desc)
    if stats is not None:
        stats.prompts += len(prompts)
        stats.new_tokens += sum(len(tokens) for tokens in new_tokens)
        stats.seconds += time.perf_counter() - start
    return [decode_text(tokenizer, tokens) for tokens in new_tokens]


def answer_alpaca_eval(backend: GenerationBackend, tokenizer: Any, prompts: Sequence[AlpacaEvalPrompt], *,
                       max_new_tokens: int, system_prompt: Optional[str] = None,
                       stats: Optional[GenerationStats] = None) -> list[str]:
    """One answer per instruction (a single user turn), in prompt order."""
    rendered = [render_prompt(tokenizer, [("user", prompt.instruction)], system_prompt) for prompt in prompts]
    return _generate_texts(backend, tokenizer, rendered, max_new_tokens, stats, desc="AlpacaEval")


def mt_bench_conversation(turns: Sequence[str], answers: Sequence[str]) -> list[tuple[str, str]]:
    """The conversation before the model's answer to turn ``len(answers)``: every earlier question with the
    model's own answer, then the current question."""
    conversation = []
    for question, answer in zip(turns, answers):
        conversation += [("user", question), ("assistant", answer)]
    return conversation + [("user", turns[len(answers)])]


def answer_mt_bench(backend: GenerationBackend, tokenizer: Any, questions: Sequence[MTBenchQuestion], *,
                    max_new_tokens: int, system_prompt: Optional[str] = None,
                    stats: Optional[GenerationStats] = None) -> list[list[str]]:
    """Every question's answers, turn by turn: all first turns in one batch, then all second turns (each with
    its first question and answer in the conversation), and so on."""
    answers: list[list[str]] = [[] for _ in questions]
    turns = max(len(question.turns) for question in questions)
    for turn in range(turns):
        active = [i for i, question in enumerate(questions) if turn < len(question.turns)]
        rendered = [render_prompt(tokenizer, mt_bench_conversation(questions[i].turns, answers[i]), system_prompt)
                    for i in active]
        texts = _generate_texts(backend, tokenizer, rendered, max_new_tokens, stats,
                                desc=f"MT-Bench turn {turn + 1}/{turns}")
        for i, text in zip(active, texts):
            answers[i].append(text)
    return answers


# --- Tiny prompt files -------------------------------------------------------------------------------------------


TINY_ALPACA_EVAL = [
    {"instruction": "count to 5", "dataset": "helpful_base"},
    {"instruction": "repeat the word moon 3 times", "dataset": "koala"},
    {"instruction": "reverse: red green blue", "dataset": "oasst"},
    {"instruction": "count to 8", "dataset": "selfinstruct"},
]

TINY_MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["count to 4", "now count to 6"]},
    {"question_id": 82, "category": "reasoning", "turns": ["reverse: sun moon star", "repeat the word sun 3 times"]},
    {"question_id": 83, "category": "math", "turns": ["count to 3", "count to 7"]},
]


def build_tiny_eval_prompts(out_dir: PathLike) -> dict[str, Path]:
    """Write ``<out_dir>/eval/alpaca_eval.json`` and ``<out_dir>/eval/mt_bench.jsonl``: a few prompts in the
    benchmarks' own layouts, for the tiny generation config and tests (same content on every call)."""
    eval_dir = Path(out_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    alpaca_path, mt_bench_path = eval_dir / "alpaca_eval.json", eval_dir / "mt_bench.jsonl"
    alpaca_path.write_text(json.dumps(TINY_ALPACA_EVAL, indent=2) + "\n")
    mt_bench_path.write_text("".join(json.dumps(row) + "\n" for row in TINY_MT_BENCH))
    return {"alpaca_eval_path": alpaca_path, "mt_bench_path": mt_bench_path}
