"""Reward annotation: score every response of a dataset and write the layout ``recipes/rao_distributed.py`` reads.

The input rows are cut into fixed shards of ``rows_per_shard`` rows; which shards exist depends on the data
only, never on the number of processes. The shards still to do are dealt round-robin to the processes; each
finished shard is written atomically to ``<output>.parts/shard_NNNNNN.jsonl``. A re-run skips the shards that
exist, so a crash costs at most the shards in flight and never duplicates or loses rows. When all shards are
done, rank 0 joins them in shard order into the output file, so the output order is the input order
whatever the number of processes. Inside a shard, responses are scored in batches of ``batch_size`` sorted
by length (less padding), again fixed by the data alone: every process runs exactly the forward passes (same
rows, same packing, same shapes) that one process would. The rewards are therefore bit-identical for any process
count *at the same intra-op thread count per process*. On CPU the thread count is part of the computation: a
matrix product split over 2 threads sums in another order than over 1 and moves a reward's 7th-8th significant
digit, and ``torchrun`` gives each of N > 1 processes one thread (``OMP_NUM_THREADS=1``) while a lone process uses
every core. Set ``OMP_NUM_THREADS`` alike (e.g. 1) to compare files written with different process counts.

``<output>.parts/manifest.json`` records the input, the shard and batch sizes and the scorer: a re-run with
other settings refuses to mix its shards with the old ones.

Output rows: ``{"prompt", "responses", "rewards", *keep_columns}``. ``prompt`` is a string when the input's
prompt field is a string (``native`` with a string prompt, ``ultrafeedback``'s instruction), else a list of
``{"role", "content"}`` messages (``ultrafeedback_binarized``, native chat prompts), so a column never mixes
types; ``responses`` are strings; ``rewards`` are floats. ``.jsonl`` / ``.json`` give JSON lines,
``.parquet`` parquet.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from rao_tune.data._rows import BadRowError, parse_row
from rao_tune.data._sources import RawRows, load_rows
from rao_tune.files import fsync_dir, fsync_tree, read_jsonl, write_atomically
from rao_tune.rewards import as_scorer

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
OUTPUT_FIELDS = ("prompt", "responses", "rewards")


@dataclass
class UnscoredRows(RawRows):
    """The rows to score (records, reader, columns, lines skipped while reading: :class:`RawRows`), what to do
    with bad rows, and ``input_record``, what the manifest records to recognise the same input on a re-run."""

    on_bad_row: str
    input_record: dict


def annotation_dataset(
    source: str,
    *,
    split: str = "train",
    layout: str = "auto",
    column_map: Optional[Mapping[str, str]] = None,
    on_bad_row: str = "error",
    **load_dataset_kwargs: Any,
) -> UnscoredRows:
    """Config builder (``dataset._component_: rao_tune.annotate.annotation_dataset``) for the rows to score.

    Args:
        source: ``datasets.load_dataset`` path: a hub id, or ``json`` / ``parquet`` with ``data_files``.
        split: e.g. ``train_prefs``; ``train[:1000]`` scores the first 1000 rows.
        layout: ``auto`` or one of ``native``, ``ultrafeedback_binarized``, ``ultrafeedback``. Existing rewards
            are ignored (replaced).
        column_map: rename columns to the native names, e.g. ``{"prompt": "question"}``.
        on_bad_row: ``error`` stops with file, row and field; ``drop`` leaves the row out and counts why.
    """
    raw = load_rows(
        source, split=split, layout=layout, column_map=column_map, on_bad_row=on_bad_row, require_rewards=False,
        **load_dataset_kwargs,
    )
    input_record = {
        "source": source,
        "split": split,
        "layout": raw.layout,
        "column_map": dict(column_map or {}),
        "load_dataset_kwargs": _plain(load_dataset_kwargs),
        "fingerprint": raw.identity,  # the data's files (sampled bytes, mtime) or datasets' fingerprint
        "num_rows": len(raw.dataset),
    }
    return UnscoredRows(**vars(raw), on_bad_row=on_bad_row, input_record=input_record)


def _plain(value: Any) -> Any:
    """JSON-able copy of config values (OmegaConf containers become plain ones, other objects their str)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, default=str))


# --- one shard ---------------------------------------------------------------------------------------------------


def _output_prompt(row: Mapping[str, Any], layout: str, messages: list[dict]) -> Any:
    field = {"native": "prompt", "ultrafeedback": "instruction"}.get(layout)
    if field is not None and isinstance(row.get(field), str):
        return messages[0]["content"]
    return messages


def _parse_shard(rows: UnscoredRows, start: int, stop: int, keep_columns: Sequence[str]):
    """Parse rows ``[start, stop)``: returns ``[(row_index, output_row_without_rewards, prompt_messages)]`` and
    the dropped rows counted by reason. A bad row raises with file, row and field unless ``on_bad_row=drop``."""
    parsed, dropped = [], collections.Counter()
    for row_index, record in zip(range(start, stop), rows.dataset.select(range(start, stop))):
        try:
            row = rows.reader.row(record)
            prompt, responses, _ = parse_row(row, rows.layout, require_rewards=False)
        except BadRowError as err:
            if rows.on_bad_row == "error":
                raise ValueError(f"{rows.reader.where(row_index, record)}, field '{err.field}': {err}") from None
            dropped[err.reason] += 1
            continue
        messages = [{"role": m.role, "content": m.text_content} for m in prompt]
        output = {"prompt": _output_prompt(row, rows.layout, messages), "responses": responses}
        output.update({column: row[column] for column in keep_columns})
        parsed.append((row_index, output, messages))
    return parsed, dropped


def _score_shard(parsed, scorer, batch_size: int, origin: str, progress) -> list[dict]:
    """Score every response of the shard in batches ordered by prompt length, a prompt's responses side by side
    (a reward-model scorer then reads each prompt once); return the output rows in input order."""
    pairs = [(i, j) for i, (_, row, _) in enumerate(parsed) for j in range(len(row["responses"]))]

    def prompt_length(pair):
        return sum(len(m["content"]) for m in parsed[pair[0]][2])

    pairs.sort(key=prompt_length)  # stable: a prompt's responses stay together and in order
    rewards = [[None] * len(row["responses"]) for _, row, _ in parsed]
    for begin in range(0, len(pairs), batch_size):
        batch = pairs[begin : begin + batch_size]
        scores = scorer.score([parsed[i][2] for i, _ in batch], [parsed[i][1]["responses"][j] for i, j in batch])
        if len(scores) != len(batch):
            raise RuntimeError(f"the scorer returned {len(scores)} rewards for {len(batch)} responses")
        for (i, j), value in zip(batch, scores):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{origin}, row {parsed[i][0]}, field 'responses[{j}]': the scorer returned {value}")
            rewards[i][j] = value
        progress.update(len(batch))
    return [
        {"prompt": row["prompt"], "responses": row["responses"], "rewards": row_rewards, **row}
        for (_, row, _), row_rewards in zip(parsed, rewards)
    ]


# --- the whole run -----------------------------------------------------------------------------------------------


def _shard_path(parts_dir: Path, index: int) -> Path:
    return parts_dir / f"shard_{index:06d}.jsonl"


def _prepare_parts_dir(parts_dir: Path, manifest: dict, num_shards: int) -> tuple[list[int], Optional[str]]:
    """Rank 0: create or check the manifest; return the shards still to do, or why the run cannot go on."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = parts_dir / "manifest.json"
    has_shards = any(parts_dir.glob("shard_*.jsonl"))
    if manifest_path.exists() and has_shards:
        previous = json.loads(manifest_path.read_text())
        changed = sorted(key for key in manifest.keys() | previous.keys() if manifest.get(key) != previous.get(key))
        if changed:
            return [], (
                f"{parts_dir} holds shards of an annotation with other settings ({', '.join(changed)} differ); "
                "re-run with the same settings to resume it, or delete that folder to start over"
            )
    else:  # nothing to protect yet (e.g. the last run stopped on a bad row before finishing a shard)
        write_atomically(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return [i for i in range(num_shards) if not _shard_path(parts_dir, i).exists()], None


def _merge(parts_dir: Path, num_shards: int, output_path: Path) -> tuple[int, collections.Counter]:
    """Rank 0: join the shards in order into ``output_path`` (atomically); return rows written and drops."""
    dropped: collections.Counter = collections.Counter()
    for index in range(num_shards):
        dropped_path = _shard_path(parts_dir, index).with_suffix(".dropped.json")
        if dropped_path.exists():
            dropped.update(json.loads(dropped_path.read_text()))
    tmp = output_path.with_name(f"{output_path.name}.tmp-{os.getpid()}")
    if output_path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(line) for i in range(num_shards) for line in _shard_path(parts_dir, i).open()]
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        num_rows = len(rows)
    else:
        num_rows = 0
        with tmp.open("wb") as out:
            for index in range(num_shards):
                with _shard_path(parts_dir, index).open("rb") as shard:
                    num_rows += sum(1 for _ in shard)
                    shard.seek(0)
                    shutil.copyfileobj(shard, out)
    fsync_tree(tmp)  # on disk before the rename makes it the output
    os.replace(tmp, output_path)
    fsync_dir(output_path.parent)
    return num_rows, dropped


def annotate(
    rows: UnscoredRows,
    scorer: Any,
    output_path: str,
    *,
    rows_per_shard: int = 256,
    batch_size: int = 16,
    keep_columns: Sequence[str] = (),
    keep_shards: bool = False,
    scorer_identity: Any = None,
    world_size: int = 1,
    rank: int = 0,
) -> dict:
    """Score every response of ``rows`` with ``scorer`` and write ``output_path``; resumes a crashed run.

    Every process calls this with the same arguments (and its ``rank``); with ``world_size > 1`` a process group
    must be up (any backend that handles CPU objects, e.g. gloo). ``scorer_identity`` (e.g. the scorer's config)
    goes into the manifest. Returns a summary dict (shard counts on every rank; rows written, dropped
    rows and the output path on rank 0).
    """
    output_path = Path(output_path)
    if output_path.suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"output_path must end with one of {OUTPUT_SUFFIXES}, got {output_path}")
    if rows_per_shard < 1 or batch_size < 1:
        raise ValueError(f"rows_per_shard and batch_size must be >= 1, got {rows_per_shard} and {batch_size}")
    clashes = set(keep_columns) & set(OUTPUT_FIELDS)
    missing = set(keep_columns) - set(rows.column_names)
    if clashes or missing:
        raise ValueError(f"keep_columns: {sorted(clashes)} are output fields, {sorted(missing)} are not input columns")
    num_rows = len(rows.dataset)
    if num_rows == 0:
        raise ValueError(f"{rows.origin}: no rows to annotate")
    scorer = as_scorer(scorer)
    num_shards = math.ceil(num_rows / rows_per_shard)
    parts_dir = output_path.with_name(output_path.name + ".parts")
    manifest = {
        "input": rows.input_record,
        "on_bad_row": rows.on_bad_row,
        "rows_per_shard": rows_per_shard,
        "batch_size": batch_size,
        "keep_columns": list(keep_columns),
        "scorer": _plain(scorer_identity if scorer_identity is not None else type(scorer).__qualname__),
    }

    # Rank 0 decides (one view of the file system), everyone learns the same answer.
    decision = [_prepare_parts_dir(parts_dir, manifest, num_shards) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    pending, refusal = decision[0]
    if refusal:
        raise ValueError(refusal)
    my_shards = pending[rank::world_size]

    # Parse this process's shards first: a bad row stops the run in seconds, not after hours of scoring.
    parsed_shards = {
        index: _parse_shard(rows, index * rows_per_shard, min((index + 1) * rows_per_shard, num_rows), keep_columns)
        for index in my_shards
    }
    num_responses = sum(len(row["responses"]) for parsed, _ in parsed_shards.values() for _, row, _ in parsed)

    done_before = num_shards - len(pending)
    progress = tqdm(
        total=num_responses,
        unit="response",
        desc=f"scoring (rank 0 of {world_size}; {done_before}/{num_shards} shards done before)",
        disable=rank != 0,
    )
    for index in my_shards:
        parsed, dropped = parsed_shards.pop(index)
        scored = _score_shard(parsed, scorer, batch_size, rows.origin, progress)
        shard_path = _shard_path(parts_dir, index)
        dropped_path = shard_path.with_suffix(".dropped.json")
        if dropped:  # written first: once the shard exists, so does its drop count
            write_atomically(dropped_path, json.dumps(dict(dropped)))
        else:
            dropped_path.unlink(missing_ok=True)  # a leftover of a run with other settings
        write_atomically(shard_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    progress.close()

    summary = {"shards": num_shards, "shards_done_before": done_before, "shards_scored_here": len(my_shards)}
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        written, dropped = _merge(parts_dir, num_shards, output_path)
        dropped += rows.skipped  # lines that could not be read at all
        if not keep_shards:
            shutil.rmtree(parts_dir)
        if dropped:
            log.warning("%s: dropped %d bad rows: %s", rows.origin, sum(dropped.values()), dict(dropped))
        summary.update(rows=written, dropped=dict(dropped), output_path=str(output_path))
        if written == 0:
            raise ValueError(f"{rows.origin}: every row was dropped; {output_path} is empty")
    if world_size > 1:
        dist.barrier()  # the output exists for every rank once this returns
    return summary


def annotation_agreement(annotated: Path, reference: Path) -> dict[str, float]:
    """How one annotation of a responses file (e.g. a reward model's) relates to another of the same rows (the
    true reward, a checker's): the fraction of pairs the reference orders strictly that ``annotated`` orders the
    same way, the number of such pairs, and both annotations' reward spreads."""
    agree = pairs = 0
    annotated_rewards, reference_rewards = [], []
    for index, (row, reference_row) in enumerate(zip(read_jsonl(annotated), read_jsonl(reference), strict=True)):
        if row["responses"] != reference_row["responses"]:
            raise ValueError(f"{annotated} row {index} holds other responses than {reference} row {index}")
        annotated_rewards += row["rewards"]
        reference_rewards += reference_row["rewards"]
        for i, better in enumerate(reference_row["rewards"]):
            for j, worse in enumerate(reference_row["rewards"]):
                if better > worse:
                    pairs += 1
                    agree += row["rewards"][i] > row["rewards"][j]
    return {"pair_agreement": agree / max(pairs, 1), "pairs": pairs,
            "annotated_std": statistics.pstdev(annotated_rewards), "reference_std": statistics.pstdev(reference_rewards)}
