"""Process-group setup for runs started by ``torchrun``, collectives that are no-ops alone, and
graceful stopping on the signals schedulers send.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Without them, or with
WORLD_SIZE=1, the run is a single process and no process group is created, so the same code runs
under ``python main.py`` and under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from utils.errors import CollectiveError
from utils.logger import get_logger

__all__ = [
    "STOP_SIGNALS",
    "DistInfo",
    "GradientSyncWatch",
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
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend=backend,
        store=_store_of_this_start(rank, world_size, timeout),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if use_cuda else None,
    )
    _logger.info("joined %s process group: rank %d of %d on %s", backend, rank, world_size, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_distributed=True)


# Keys of the start handshake in the rendezvous store; the process group's own keys go under "{_START_KEY}/{n}/".
_START_KEY = "focal/start"
_POLL_S = 0.05


def _generation(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> int:
    """A number that every rank of this start of the job gets and that no earlier start used.

    Rank 0 draws it (a counter in the store) and hands it to each other rank in reply to a random nonce that
    rank has just written. The store may still hold the nonces of the processes of an earlier start; rank 0
    answers whatever nonce it reads, again whenever it changes, until each rank confirms under the new number,
    so a stale nonce delays nothing and a stale number is never taken.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_START_KEY}/hello/{rank}", nonce)
        welcome = f"{_START_KEY}/welcome/{nonce}"
        store.wait([welcome], timeout)
        generation = int(store.get(welcome))
        store.delete_key(welcome)
        store.set(f"{_START_KEY}/{generation}/joined/{rank}", "1")
        return generation
    generation = store.add(f"{_START_KEY}/generation", 1)
    answered: dict[int, bytes] = {}
    pending = set(range(1, world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        pending = {r for r in pending if not store.check([f"{_START_KEY}/{generation}/joined/{r}"])}
        if not pending:
            return generation
        for r in pending:
            hello = f"{_START_KEY}/hello/{r}"
            if store.check([hello]) and (nonce := store.get(hello)) != answered.get(r):
                store.set(f"{_START_KEY}/welcome/{nonce.decode()}", str(generation))
                answered[r] = nonce
        if time.monotonic() > deadline:
            raise dist.DistStoreError(
                f"ranks {sorted(pending)} did not join the process group within {timeout.total_seconds():.0f} s"
            )
        time.sleep(_POLL_S)


def _store_of_this_start(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The ``env://`` rendezvous store, narrowed to keys that only this start of the job writes.

    torchrun's agent serves the store and keeps it across ``--max-restarts`` restarts, so after a restart it
    still holds the previous workers' keys, among them the addresses the process group connects to, under
    the same names. A restarted rank that read them before its peer wrote new ones connected to the dead
    worker ("Gloo connectFullMesh failed ... Connection refused"; NCCL's unique id is exchanged the same way)
    and the restart failed. The restart count cannot name the start: each agent counts its own restarts,
    and restarts for a change of membership are not counted. Hence ``_generation``.
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"{_START_KEY}/{_generation(store, rank, world_size, timeout)}/", store)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Turn a failure of the backend in collective ``name`` into ``CollectiveError``.

    gloo raises a plain RuntimeError when a peer dies ("Connection closed by peer") or a wait times out, NCCL a
    ``dist.DistError``; neither says by its type that the cause is another rank, so the collective says it.
    """
    try:
        yield
    except RuntimeError as error:
        raise CollectiveError(f"{name} failed: {error}") from error


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run."""
    return not _distributed() or dist.get_rank() == 0


class GradientSyncWatch:
    """DDP's gradient all-reduce (its default: average over ranks) as a comm hook that remembers a failure.

    gloo fails a collective with a plain RuntimeError; raised from inside backward it cannot be told from a bug
    by its type. ``typed_failures`` turns it into ``CollectiveError`` exactly when this all-reduce is what failed
    (by where it came from, not by its message). NCCL raises ``dist.DistError`` subclasses itself, so ``attach``
    is meant for gloo. (DDP's one bucket rebuild, in the second step's forward, is not covered.)
    """

    def __init__(self) -> None:
        self.failure: BaseException | None = None

    def attach(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> GradientSyncWatch:
        ddp_model.register_comm_hook(self, GradientSyncWatch._allreduce)
        return self

    @staticmethod
    def _allreduce(watch, bucket):  # no annotations: DDP checks them against the real classes, which strings are not
        """(this watch, a dist.GradBucket) -> torch.futures.Future of the averaged bucket."""

        def result(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            try:
                return done.value()
            except RuntimeError as error:
                watch.failure = error
                raise

        try:
            return default_hooks.allreduce_hook(None, bucket).then(result)
        except RuntimeError as error:
            watch.failure = error
            raise

    @contextlib.contextmanager
    def typed_failures(self) -> Iterator[None]:
        """Run a backward pass; a failure of the gradient all-reduce in it is raised as ``CollectiveError``."""
        self.failure = None
        try:
            yield
        except RuntimeError as error:
            if self.failure is None:
                raise  # not the all-reduce: a bug keeps its traceback
            raise CollectiveError(f"DDP's gradient all_reduce failed: {self.failure}") from error


def barrier() -> None:
    """Wait for every rank (no-op in a single-process run)."""
    if _distributed():
        with _collective("barrier"):
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it (unchanged in a single-process run)."""
    if _distributed():
        with _collective("all_reduce"):
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
    with _collective("all_gather_object"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable), on every rank (``obj`` itself in a single process)."""
    if not _distributed():
        return obj
    box = [obj]
    with _collective("broadcast_object_list"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (``device``: where the backend reduces).

    Like the other collectives here, raises ``CollectiveError`` when the backend fails (through ``all_reduce_sum``).
    """
    if not _distributed():
        return flag
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


# What SLURM (``--signal``, ``scancel``), Kubernetes and cloud schedulers send before they kill a job, and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# StopRequest contexts entered and not left in this process (read by _shield_forked_child).
_active_stop_requests = 0


class StopRequest:
    """Turns the stop signals into a flag the training loop polls between steps.

    The handler only sets the flag, so the step in progress (and a checkpoint being written) finishes.
    Ranks agree to stop by reducing the flag (``any_rank``), so they all stop after the same step even
    when the signal reaches them at different times. A second SIGINT (Ctrl-C twice) gets the handler
    SIGINT had before, by default KeyboardInterrupt: an abort at once. Use as a context manager: the
    previous handlers are restored on exit. Handlers can only be installed from the main thread.
    Processes forked while it is active (DataLoader workers) are shielded: see ``_shield_forked_child``.
    """

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequest:
        global _active_stop_requests
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        _active_stop_requests += 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _active_stop_requests
        _active_stop_requests -= 1
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def __call__(self) -> bool:
        """True once a stop signal reached this process."""
        return self.received is not None


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what PyTorch's loader workers do on their parent's SIGTERM


_PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies (linux/prctl.h)
# While the main thread forks during a StopRequest: its signal mask before SIGTERM was blocked, and its pid.
_forking: tuple[set[signal.Signals], int] | None = None


def _block_sigterm_for_fork() -> None:
    """Block SIGTERM while the main thread forks during a StopRequest, so the child starts with it blocked and so
    do the threads that the at-fork hooks run before ours start in it (a SIGTERM meanwhile stays pending)."""
    global _forking
    if _active_stop_requests and threading.current_thread() is threading.main_thread():
        _forking = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}), os.getpid()


def _restore_mask_after_fork() -> None:
    global _forking
    if _forking is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _forking[0])
        _forking = None


def _shield_forked_child() -> None:
    """In a child the main thread forked during a StopRequest (a DataLoader worker): outlive the stop signals,
    not the parent.

    The stop signals reach more than the main process: torchrun signals each worker's whole process group, a
    terminal its foreground group, SLURM every process of the job step. A loader worker that dies of one
    (PyTorch's workers die of any SIGTERM their parent did not send) ends the run with "DataLoader worker ... is
    killed by signal" before the main process finishes its step and checkpoint. So the child ignores SIGINT and
    SIGUSR1, and takes SIGTERM from its parent only (how the main process ends a stuck worker).

    It dies with its parent (SIGKILL through PR_SET_PDEATHSIG): it holds copies of the parent's sockets, the
    process group's among them, and while it lives the other ranks see no dead peer (PyTorch's workers notice
    a dead parent within 5 s, a busy one later).
    """
    global _forking
    if _forking is None:
        return
    parent, _forking = _forking[1], None
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_end_on_sigterm_from, args=(parent,), name="sigterm-from-parent", daemon=True).start()


if sys.platform == "linux":  # prctl and sigwaitinfo
    os.register_at_fork(
        before=_block_sigterm_for_fork, after_in_parent=_restore_mask_after_fork, after_in_child=_shield_forked_child
    )
