"""Raw rows from a hub dataset or from local files, with every problem named by file and line (or row).

Local JSON files (``source: json``, JSON lines or one JSON array) are read here rather than by ``datasets``: a
malformed line, a non-UTF-8 byte or an empty file then gives one line naming the file and the line, and
``on_bad_row: drop`` can skip and count such lines. Each record keeps its JSON text and is parsed where it is
used (in the tokenizing workers), so rows of different shapes never meet Arrow's type inference. Every other
source goes through ``datasets.load_dataset``.
"""

from __future__ import annotations

import collections
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import datasets
from datasets import Dataset as HFDataset
from datasets import load_dataset

from rao_tune.data._rows import LAYOUTS, BadRowError, detect_layout
from rao_tune.files import hash_file_sample

# datasets' packaged loaders that read local files rather than a hub id.
_FILE_LOADERS = ("json", "csv", "parquet", "arrow", "text")
_JSON, _WHERE = "__json__", "__where__"
_LAYOUT_PROBE_ROWS = 100  # JSON records read to tell the layout from their keys


@dataclass(frozen=True)
class RowReader:
    """Turns a stored record into a row dict and names where it came from. Small and picklable: it travels to
    the tokenizing worker processes."""

    layout: str
    origin: str
    json_records: bool
    rename: tuple[tuple[str, str], ...] = ()  # (data's name, our name), for JSON records

    def row(self, record: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self.json_records:
            return record
        row = _parse_json_record(record[_JSON])
        for theirs, ours in self.rename:
            if theirs in row:
                row[ours] = row.pop(theirs)
        return row

    def where(self, index: int, record: Mapping[str, Any]) -> str:
        return record[_WHERE] if self.json_records else f"{self.origin}, row {index}"


@dataclass
class RawRows:
    """The rows of a source: ``dataset`` (records), how to read them (``reader``), their column names, lines
    skipped while reading (``on_bad_row: drop``), and ``identity``, a digest that changes when the data does."""

    dataset: HFDataset
    reader: RowReader
    column_names: list[str]
    skipped: collections.Counter
    identity: str

    @property
    def layout(self) -> str:
        return self.reader.layout

    @property
    def origin(self) -> str:
        return self.reader.origin


def load_rows(
    source: str,
    *,
    split: str,
    layout: str = "auto",
    column_map: Optional[Mapping[str, str]] = None,
    on_bad_row: str = "error",
    require_rewards: bool = True,
    **load_dataset_kwargs: Any,
) -> RawRows:
    """The rows of ``source`` (``column_map`` maps our column names to the data's), their layout (detected when
    ``auto``) and the name used in errors."""
    if on_bad_row not in ("error", "drop"):
        raise ValueError(f"on_bad_row must be 'error' or 'drop', got {on_bad_row!r}")
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    rename = {theirs: ours for ours, theirs in (column_map or {}).items() if theirs != ours}
    local_json = _local_json_files(source, split, load_dataset_kwargs)
    if local_json:
        records, skipped = _read_json_files(local_json, on_bad_row)
        dataset = _apply_split_slice(HFDataset.from_dict(records), split)
        column_names = _json_column_names(dataset[_JSON][:_LAYOUT_PROBE_ROWS], rename)
        identity = _files_identity(local_json, split)
    else:
        dataset = load_dataset(source, split=split, **load_dataset_kwargs)
        identity = _datasets_identity(dataset)
        if rename:
            dataset = dataset.rename_columns(rename)
        column_names, skipped = dataset.column_names, collections.Counter()
    if layout == "auto":
        layout = detect_layout(column_names, require_rewards=require_rewards)
    data_files = load_dataset_kwargs.get("data_files")
    reader = RowReader(layout, str(data_files) if data_files else source, json_records=bool(local_json),
                       rename=tuple(rename.items()))
    return RawRows(dataset, reader, column_names, skipped, identity)


def data_identity(source: str, *, split: str, **load_dataset_kwargs: Any) -> str:
    """What :attr:`RawRows.identity` will be, without reading the rows of local JSON files (a cache can then be
    found in a moment)."""
    local_json = _local_json_files(source, split, load_dataset_kwargs)
    if local_json:
        return _files_identity(local_json, split)
    return _datasets_identity(load_dataset(source, split=split, **load_dataset_kwargs))


def _datasets_identity(dataset: HFDataset) -> str:
    return f"datasets:{dataset._fingerprint}"  # datasets' identity of the loaded data (revision, files, mtimes)


# --------------------------------------------------------------------------------------------- local JSON files
def _local_json_files(source: str, split: str, load_dataset_kwargs: Mapping[str, Any]) -> Optional[list[Path]]:
    """The JSON files of ``split`` when we read them ourselves (they all exist locally), else None (remote files
    and other loaders go to datasets)."""
    data_files = load_dataset_kwargs.get("data_files")
    if source in _FILE_LOADERS and not data_files and not load_dataset_kwargs.get("data_dir"):
        # Without files, datasets' file loaders would read whatever matches in the working directory.
        raise ValueError(f"dataset source {source!r} reads local files: set data_files (e.g. dataset.data_files=train.jsonl)")
    if source != "json" or not set(load_dataset_kwargs) <= {"data_files"}:
        return None
    if isinstance(data_files, Mapping):
        name = split.split("[")[0]
        if name not in data_files:
            raise ValueError(f"data_files has no files for split {name!r} (it has {sorted(data_files)})")
        data_files = data_files[name]
    files = [Path(f) for f in ([data_files] if isinstance(data_files, (str, Path)) else list(data_files or []))]
    return files if files and all(f.is_file() for f in files) else None


def _read_json_files(files: list[Path], on_bad_row: str) -> tuple[dict[str, list[str]], collections.Counter]:
    texts, places, skipped = [], [], collections.Counter()
    for path in files:
        data = path.read_bytes()
        if not data.strip():
            raise ValueError(f"{path}: the file is empty (no rows)")
        if data.lstrip()[:1] == b"[":
            for index, element in enumerate(_read_json_array(path, data)):
                texts.append(json.dumps(element))
                places.append(f"{path}, row {index}")
            continue
        for line_number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                texts.append(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                if on_bad_row == "error":
                    raise ValueError(f"{path}, line {line_number}: not valid UTF-8 (byte {err.start} of the line)") from None
                skipped["not_utf8"] += 1
                continue
            places.append(f"{path}, line {line_number}")
    if not texts:
        raise ValueError(f"{', '.join(map(str, files))}: no readable rows")
    return {_JSON: texts, _WHERE: places}, skipped


def _read_json_array(path: Path, data: bytes) -> list:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not valid UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a JSON file must hold a list of rows (or one row per line)")
    return rows


def _parse_json_record(text: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRowError("line", f"not valid JSON ({err.msg}, column {err.colno})", "malformed_json") from None
    if not isinstance(row, dict):
        raise BadRowError("line", f"a row must be a JSON object, got {type(row).__name__}", "malformed_json")
    return row


def _json_column_names(texts: list[str], rename: Mapping[str, str]) -> list[str]:
    names: dict[str, None] = {}
    for text in texts:
        try:
            row = _parse_json_record(text)
        except BadRowError:
            continue
        names.update(dict.fromkeys(rename.get(key, key) for key in row))
    return list(names)


def _apply_split_slice(dataset: HFDataset, split: str) -> HFDataset:
    """``train[:1000]`` or ``train[10%:]`` as ``datasets.load_dataset`` reads it."""
    if "[" not in split:
        return dataset
    name = split.split("[")[0]
    instruction = datasets.ReadInstruction.from_spec(split).to_absolute({name: len(dataset)})[0]
    return dataset.select(range(instruction.from_ or 0, len(dataset) if instruction.to is None else instruction.to))


def _files_identity(files: list[Path], split: str) -> str:
    digest = hashlib.sha256(f"files:{split}".encode())
    for path in files:
        digest.update(str(path.resolve()).encode())
        hash_file_sample(digest, path)
    return digest.hexdigest()
