"""Process-group set-up that works the same on CPU (gloo) and CUDA (nccl)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Start the process group with the backend the device needs; return (world_size, rank).

    Under ``torchrun`` / ``tune run --nproc_per_node`` the rendezvous variables are set; a plain
    ``python -m`` or in-process call (tests) gets a one-process group on a free local port.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
            os.environ["MASTER_PORT"] = str(free_port())
        # CPU tensors (e.g. gathered checkpoints) still need gloo beside nccl on CUDA.
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_world_size(), dist.get_rank()


def _all_reduce(values: list[float], device: torch.device, op: dist.ReduceOp) -> list[float]:
    """``values`` reduced over ranks in one collective (float64); the values themselves with one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(value) for value in values]
    packed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=op)
    return packed.tolist()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks (one collective for all of them)."""
    keys = sorted(values)
    return dict(zip(keys, _all_reduce([float(values[k]) for k in keys], device, dist.ReduceOp.SUM)))


def max_over_ranks(value: float, device: torch.device = torch.device("cpu")) -> float:
    """The largest ``value`` over ranks. A CPU tensor by default: the CUDA process group is ``cuda:nccl,cpu:gloo``,
    so a CPU flag goes through gloo."""
    return _all_reduce([float(value)], device, dist.ReduceOp.MAX)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_process_env() -> dict[str, str]:
    """The rendezvous variables of a one-process group on a fresh local port, as ``tune run --nproc_per_node 1``
    sets them (in-process recipe runs: the toy pipeline, tests)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
