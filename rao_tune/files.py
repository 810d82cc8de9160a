"""Writing output files so that a crash leaves either the whole file (or folder) or none of it, and recognising
files by a sample of their bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence

import torch


@contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO]:
    """A temporary file beside ``path``, flushed to disk and renamed into place when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with partial.open(mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
    with _atomic_file(path, "w") as handle:
        handle.write(text)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Mapping]) -> Path:
    """``rows`` as JSON lines at ``path``, written atomically (parent folders created); returns the path."""
    write_atomically(Path(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


def torch_save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` with the same guarantee as :func:`write_atomically`."""
    with _atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


SAMPLE_BYTES = 1 << 20  # bytes hashed at the start, middle and end of a file by hash_file_sample


def hash_file_sample(digest: Any, path: Path) -> None:
    """Feed ``digest`` a file's name, size, modification time and three 1 MiB samples (start, middle, end):
    any rewrite of the file changes them, and reading 3 MiB keeps the check to a moment even for a 16 GB
    checkpoint. A copied file (new mtime) counts as changed: recomputing beats trusting a stale result."""
    stat = Path(path).stat()
    digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        for offset in sorted({0, max(0, stat.st_size // 2 - SAMPLE_BYTES // 2), max(0, stat.st_size - SAMPLE_BYTES)}):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))


def tree_checksums(path: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``path``: what a cache records to check itself on load."""
    path = Path(path)
    sums = {}
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(item, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sums[item.relative_to(path).as_posix()] = digest.hexdigest()
    return sums


def tree_damage(path: Path, checksums: Mapping[str, str]) -> Optional[str]:
    """What differs between the files under ``path`` and their recorded ``checksums`` (None: nothing)."""
    try:
        found = tree_checksums(path)
    except OSError as err:
        return f"unreadable ({err})"
    for name, expected in checksums.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != expected:
            return f"{name} does not match its checksum (truncated or overwritten)"
    return None


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folders themselves to disk (before a rename makes them visible)."""
    path = Path(path)
    for item in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [path]:
        descriptor = os.open(item, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_dir(source: Path, target: Path) -> None:
    """Rename the complete folder ``source`` to ``target``; an older ``target`` is moved aside first and deleted
    after, so a crash at any moment leaves a complete copy under one of the two names."""
    source, target = Path(source), Path(target)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
