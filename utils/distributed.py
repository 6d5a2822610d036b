"""Process-group setup for runs started by ``torchrun``, and collectives that are no-ops alone.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Without them, or with
WORLD_SIZE=1, the run is a single process and no process group is created, so the same code runs
under ``python main.py`` and under ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.logger import get_logger

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "cleanup", "init_distributed", "is_main_process"]

_logger = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU), or describe a single process.

    On CUDA each process is bound to GPU ``LOCAL_RANK``. ``timeout_s`` bounds how long a collective
    waits for the other ranks before failing (instead of hanging forever).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if world_size <= 1:
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device, is_distributed=False)
    rank = _env_int("RANK", 0)
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if use_cuda else None,
    )
    _logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world_size, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_distributed=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run."""
    return not _distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single-process run)."""
    if _distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged in a single-process run)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if _distributed():
        dist.destroy_process_group()
