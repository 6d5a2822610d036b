"""Process-group setup for runs started by ``torchrun``, collectives that are no-ops alone, and
graceful stopping on the signals schedulers send.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Without them, or with
WORLD_SIZE=1, the run is a single process and no process group is created, so the same code runs
under ``python main.py`` and under ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from utils.logger import get_logger

__all__ = [
    "STOP_SIGNALS",
    "DistInfo",
    "StopRequest",
    "all_gather_objects",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup",
    "init_distributed",
    "is_main_process",
]

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


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (``[obj]`` in a single process)."""
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable), on every rank (``obj`` itself in a single process)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (``device``: where the backend reduces)."""
    if not _distributed():
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


# What SLURM (``--signal``, ``scancel``), Kubernetes and cloud schedulers send before they kill a job.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Turns the stop signals into a flag the training loop polls between steps.

    The handler only sets the flag, so the step in progress (and a checkpoint being written) finishes.
    Ranks agree to stop by reducing the flag (``any_rank``), so they all stop after the same step even
    when the signal reaches them at different times. Use as a context manager: the previous handlers
    are restored on exit. Handlers can only be installed from the main thread.
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __call__(self) -> bool:
        """True once a stop signal reached this process."""
        return self.received is not None
