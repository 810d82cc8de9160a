"""The frozen reference model's log-probs, computed once before training instead of at every step.

The reference never changes, so its log-prob of every response (and of every prompt after t0) is computed once,
data-parallel over the processes, and stored beside the run under a fingerprint of everything it depends on:
the reference weights, the model's architecture and dtype, and the tokenized data (which covers the data itself,
the tokenizer, its chat format and ``max_seq_len``). A re-run or a resume with the same fingerprint reads the
file and never loads the reference model; anything else computes a new file.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchtune.training import FormattedCheckpointFiles
from tqdm import tqdm

from rao_tune.files import hash_file_sample, torch_save_atomically
from rao_tune.training.logprobs import sequence_logps
from rao_tune.training.loop import sharded_indices

log = logging.getLogger(__name__)

FORMAT_VERSION = "rao_tune.reference_logps.v1"


@dataclass
class ReferenceLogProbs:
    """Reference log-probs of every example of a dataset: ``response_logps[offsets[i]:offsets[i + 1]]`` are
    example i's responses, ``prompt_logps[i]`` its prompt after t0 (fp32, CPU)."""

    response_logps: Tensor
    offsets: Tensor
    prompt_logps: Tensor

    def __len__(self) -> int:
        return self.prompt_logps.numel()

    def example(self, index: int) -> dict[str, Any]:
        start, end = self.offsets[index].item(), self.offsets[index + 1].item()
        return {
            "reference_logps": self.response_logps[start:end].tolist(),
            "reference_prompt_logps": self.prompt_logps[index].item(),
        }


class WithReferenceLogProbs(Dataset):
    """``dataset`` whose examples also carry their precomputed reference log-probs (the collators pass them on
    as ``reference_logps`` / ``reference_prompt_logps``, one per response)."""

    def __init__(self, dataset: Dataset, reference: ReferenceLogProbs) -> None:
        if len(dataset) != len(reference):
            raise ValueError(f"{len(reference)} precomputed reference entries for {len(dataset)} examples")
        self.dataset, self.reference = dataset, reference

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], **self.reference.example(index)}


# ---------------------------------------------------------------------------------------------- fingerprint
def checkpoint_files(cfg_checkpointer: Mapping) -> list[Path]:
    """The weight files a torchtune checkpointer config reads (a list, or the ``{filename_format, max_filename}``
    mapping of sharded HF checkpoints)."""
    files = cfg_checkpointer["checkpoint_files"]
    if isinstance(files, Mapping):
        files = FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
    return [Path(cfg_checkpointer["checkpoint_dir"]) / name for name in files]


def reference_fingerprint(cfg_checkpointer: Mapping, cfg_model: DictConfig, dtype: torch.dtype, data_fingerprint: str) -> str:
    """sha256 of the reference weight files (sampled, see :func:`rao_tune.files.hash_file_sample`), the model
    config, the dtype and the tokenized data (``data_fingerprint``: a ``RewardAnnotatedDataset``'s fingerprint,
    which covers data, tokenizer, chat format and ``max_seq_len``, or :func:`tokens_fingerprint`)."""
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for path in checkpoint_files(cfg_checkpointer):
        hash_file_sample(digest, path)
    digest.update(OmegaConf.to_yaml(cfg_model, resolve=True).encode())
    digest.update(str(dtype).encode())
    digest.update(data_fingerprint.encode())
    return digest.hexdigest()


def tokens_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of every example's prompt and response tokens, for data that has no fingerprint of its own."""
    digest = hashlib.sha256()
    for example in examples:
        for tokens in (example["prompt_tokens"], *example["response_tokens"]):
            digest.update(len(tokens).to_bytes(8, "little"))
            digest.update(array("q", tokens).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- computation
@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    dataset: Dataset,
    *,
    collate_fn: Callable[[list], dict[str, Tensor]],
    batch_size: int,
    device: torch.device,
    world_size: int,
    rank: int,
    chunk_tokens: int,
) -> ReferenceLogProbs:
    """Every example's reference log-probs, each process scoring its share; every process gets the whole table."""
    counts = torch.tensor([len(dataset[i]["response_tokens"]) for i in range(len(dataset))])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    response_logps = torch.zeros(int(offsets[-1]), dtype=torch.float32, device=device)
    prompt_logps = torch.zeros(len(dataset), dtype=torch.float32, device=device)
    batches = list(sharded_indices(len(dataset), batch_size=batch_size, world_size=world_size, rank=rank))
    for indices in tqdm(batches, desc="reference log-probs", disable=rank != 0):
        batch = collate_fn([dataset[i] for i in indices or [0]])
        batch = {key: value.to(device) for key, value in batch.items()}
        batch_response_logps, batch_prompt_logps = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
        if not indices:  # this rank ran out of examples: the forward only keeps FSDP's collectives in step
            continue
        example_ids = torch.tensor(indices, device=device)
        response_slots = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices]).to(device)
        response_logps[response_slots] = batch_response_logps
        prompt_logps[example_ids[batch["prompt_ids"]]] = batch_prompt_logps
    if dist.is_initialized() and world_size > 1:
        dist.all_reduce(response_logps)  # each slot was written by exactly one process, zeros elsewhere
        dist.all_reduce(prompt_logps)
    return ReferenceLogProbs(response_logps.cpu(), offsets, prompt_logps.cpu())


_TABLE_FIELDS = ("response_logps", "offsets", "prompt_logps")


def _table_checksum(table: Any) -> str:
    """sha256 of the table's numbers (a dict of tensors or a :class:`ReferenceLogProbs`)."""
    digest = hashlib.sha256()
    for name in _TABLE_FIELDS:
        tensor = table[name] if isinstance(table, dict) else getattr(table, name)
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_table(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """The stored table and None, or None and why it cannot be used (unreadable, no or a wrong checksum)."""
    try:
        stored = torch.load(path, weights_only=True)
        if "checksum" not in stored:
            return None, "no checksum (written by an older version)"
        if _table_checksum(stored) != stored["checksum"]:
            return None, "its numbers do not match their checksum"
        return stored, None
    except Exception as err:  # a truncated zip, a file of zeros, a pickle of something else
        return None, f"unreadable: {type(err).__name__}: {err}"


def load_or_compute_reference_logps(
    cache_dir: Path,
    fingerprint: Callable[[], str],
    compute: Callable[[], ReferenceLogProbs],
    *,
    rank: int,
) -> ReferenceLogProbs:
    """The table stored under this fingerprint in ``cache_dir`` if there is one (read by rank 0 and sent to the
    others), else ``compute()`` (collective) written there by rank 0, atomically."""
    cache_dir = Path(cache_dir)
    found: list[Optional[Any]] = [None, None]
    if rank == 0:
        key = fingerprint()
        path = cache_dir / f"{key[:24]}.pt"
        found = [key, None]
        if path.exists():
            stored, damage = _read_table(path)
            if damage is not None:
                log.warning("Reference log-probs %s are damaged (%s): computing them again", path, damage)
            elif stored.get("fingerprint") == key:
                found[1] = stored
                log.info("Reference log-probs: reusing %s (no reference model is loaded)", path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    key, stored = found
    if stored is not None:
        return ReferenceLogProbs(stored["response_logps"], stored["offsets"], stored["prompt_logps"])

    table = compute()
    gc.collect()  # the reference model built by compute() goes before training starts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rank == 0:
        path = cache_dir / f"{key[:24]}.pt"
        torch_save_atomically(
            {"fingerprint": key, "format": FORMAT_VERSION, "response_logps": table.response_logps,
             "offsets": table.offsets, "prompt_logps": table.prompt_logps, "checksum": _table_checksum(table)},
            path,
        )
        log.info("Reference log-probs of %d examples written to %s", len(table), path)
    if dist.is_initialized():
        dist.barrier()
    return table
