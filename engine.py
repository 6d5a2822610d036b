"""The training and evaluation loops: one epoch of training, exact distributed evaluation, throughput."""

from __future__ import annotations

import contextlib
import datetime
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data.datasets import IGNORED_LABEL
from utils.amp import GradientStepper
from utils.distributed import GradientSyncWatch, all_reduce_sum, is_main_process
from utils.ema import ModelEma
from utils.errors import NonFiniteLossError
from utils.metrics import AverageMeter, MetricsWriter, accuracy_counts
from utils.seeding import STEP_STREAM, derive_seed, seed_all


@dataclass
class TrainState:
    """What the loop needs besides the model and data; ``global_step`` counts optimizer steps.

    ``stop_requested`` is polled every step (a local flag, e.g. set by a signal handler); once any rank
    reports it, every rank leaves the epoch after the same optimizer step and ``stopped`` is set.
    ``seed`` and ``rank`` key the random numbers of each step (Mixup/CutMix, drop path).
    """

    optimizer: torch.optim.Optimizer
    scheduler: object
    stepper: GradientStepper
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    accumulation_steps: int = 1
    clip_grad: float = 0.0
    print_freq: int = 10
    skip_nonfinite: bool = False
    global_step: int = 0
    metrics: MetricsWriter | None = None
    stop_requested: Callable[[], bool] = field(default=lambda: False)
    stopped: bool = False
    seed: int = 0
    rank: int = 0
    ema: ModelEma | None = None  # updated after every optimizer step
    gradient_sync: GradientSyncWatch | None = None  # DDP under gloo: a failed gradient all-reduce is a CollectiveError


@dataclass
class EpochMeters:
    """Running averages of one epoch's training statistics.

    A mid-epoch checkpoint stores them (``state_dict``), so a resumed epoch reports the same averages as
    an uninterrupted one.
    """

    loss: AverageMeter = field(default_factory=AverageMeter)
    grad_norm: AverageMeter = field(default_factory=AverageMeter)
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers (safe for weights-only loading)."""
        return {
            "loss": dict(vars(self.loss)),
            "grad_norm": dict(vars(self.grad_norm)),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self.loss).update(state["loss"])
        vars(self.grad_norm).update(state["grad_norm"])
        self.skipped_steps = int(state["skipped_steps"])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (whose state_dict has the plain keys)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.amp autocast for ``dtype`` on ``device``'s type (a no-op context when dtype is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _agree(loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(every rank's loss is finite, some rank asked to stop), with one all-reduce for both.

    All ranks must take the same branch, so both answers are agreed on, never decided locally.
    """
    flags = torch.tensor(
        [0.0 if torch.isfinite(loss).item() else 1.0, 1.0 if stop_requested else 0.0], device=loss.device
    )
    nonfinite, stop = all_reduce_sum(flags).tolist()
    return nonfinite == 0, stop > 0


def _memory_text(device: torch.device) -> str:
    """Peak memory for the step log: the CUDA allocator's peak on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return f"mem {torch.cuda.max_memory_allocated(device) / 2**20:.0f}MB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"peak rss {peak / (2**20 if sys.platform == 'darwin' else 2**10):.0f}MB"


def accumulation_group(step: int, num_steps: int, accumulation_steps: int) -> tuple[bool, int]:
    """(whether micro-batch ``step`` of an epoch of ``num_steps`` ends with an optimizer step, its group's size).

    Micro-batches are grouped ``accumulation_steps`` at a time from the start of the epoch. When that does not
    divide the epoch, the last group holds the remainder and still ends with a step, so no micro-batch is computed
    and then dropped; the loss is divided by the group's size, so every step averages over its own micro-batches.
    An epoch therefore takes ceil(num_steps / accumulation_steps) optimizer steps.
    """
    first = step - step % accumulation_steps
    size = min(accumulation_steps, num_steps - first)
    return step == first + size - 1, size


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    state: TrainState,
    epoch: int,
    num_epochs: int,
    mixup_fn: Callable | None,
    logger: logging.Logger,
    start_step: int = 0,
    meters: EpochMeters | None = None,
) -> dict:
    """Train one epoch from micro-step ``start_step``; returns train loss, lr, images/s, epoch time.

    ``loader`` yields the batches from ``start_step`` on (the caller skips the done ones in the
    sampler); ``meters`` holds the averages of the steps before ``start_step`` when resuming.
    Gradients are accumulated over ``accumulation_steps`` micro-batches (the epoch's last step over the
    remainder, see ``accumulation_group``); DDP synchronises only on the last one (``no_sync``). The
    logged and returned ``lr`` is the rate the optimizer step used (the epoch's last step for the
    returned one); ``images_per_s`` is the whole job's rate (the images of every rank over this rank's
    epoch time; the ranks keep pace through the per-step all-reduce). A non-finite loss stops training
    (NonFiniteLossError) unless ``skip_nonfinite``, which drops that step on every rank. Every step first
    seeds the random generators from (seed, rank, epoch, step), so Mixup/CutMix and drop path do not depend
    on where the run was resumed. A stop request ends the epoch early, after an optimizer step (``state.stopped``).
    """
    model.train()
    state.optimizer.zero_grad(set_to_none=True)
    state.stopped = False
    meters = meters if meters is not None else EpochMeters()
    accum = state.accumulation_steps
    num_steps = start_step + len(loader)
    time_meter = AverageMeter()
    images, stop_agreed, step, step_lr = 0, False, start_step - 1, None
    start = end = time.time()
    for step, (samples, targets) in enumerate(loader, start=start_step):
        seed_all(derive_seed(STEP_STREAM, state.seed, state.rank, epoch, step))
        samples = samples.to(state.device, non_blocking=True)
        targets = targets.to(state.device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update, group_size = accumulation_group(step, num_steps, accum)
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this micro-batch's optimizer step uses
        sync = model.no_sync() if hasattr(model, "no_sync") and not update else contextlib.nullcontext()
        with sync:
            with autocast(state.device, state.amp_dtype):
                outputs = model(samples)
            loss = state.criterion(outputs.float(), targets)
            finite, stop = _agree(loss, state.stop_requested())
            stop_agreed = stop_agreed or stop
            grad_norm = None
            if finite:
                with state.gradient_sync.typed_failures() if state.gradient_sync else contextlib.nullcontext():
                    grad_norm = state.stepper(
                        loss / group_size, state.optimizer, model.parameters(), clip_grad=state.clip_grad, update=update
                    )
            elif not state.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch} step {step} (global step {state.global_step}); "
                    "set TRAIN.SKIP_NONFINITE True to skip such steps"
                )
            else:
                logger.warning("skipping step %d of epoch %d: non-finite loss", step, epoch)
                state.optimizer.zero_grad(set_to_none=True)
                meters.skipped_steps += 1
        if finite:
            if update:
                step_lr = lr
                state.global_step += 1
                state.scheduler.step_update(state.global_step)
                if state.ema is not None:
                    state.ema.update(unwrap_model(model))
            meters.loss.update(loss.item(), targets.size(0))
            if grad_norm is not None:
                meters.grad_norm.update(float(grad_norm))
            images += samples.size(0)
        time_meter.update(time.time() - end)
        end = time.time()
        if step % state.print_freq == 0 or step == num_steps - 1:
            eta = datetime.timedelta(seconds=int(time_meter.avg * (num_steps - step - 1)))
            logger.info(
                f"Train: [{epoch}/{num_epochs}][{step}/{num_steps}]\teta {eta} lr {lr:.6f}\t"
                f"time {time_meter.val:.4f} ({time_meter.avg:.4f})\t"
                f"loss {meters.loss.val:.4f} ({meters.loss.avg:.4f})\t"
                f"grad_norm {meters.grad_norm.val:.4f} ({meters.grad_norm.avg:.4f})\t"
                f"{_memory_text(state.device)}"
            )
            if state.metrics is not None:
                state.metrics.add_scalars(
                    state.global_step,
                    {"train/loss": meters.loss.val, "train/lr": lr, "train/grad_norm": meters.grad_norm.val},
                )
        if stop_agreed and update:
            state.stopped = True
            logger.info("stop requested: leaving epoch %d after %d of %d steps", epoch, step + 1, num_steps)
            break
    epoch_time = time.time() - start
    job_images, world_size = all_reduce_sum(torch.tensor([float(images), 1.0], device=state.device)).tolist()
    rate, job_rate = images / max(epoch_time, 1e-9), job_images / max(epoch_time, 1e-9)
    per_rank = f" ({int(world_size)} processes, {rate:.1f} each)" if world_size > 1 else ""
    logger.info(
        f"Train: epoch {epoch} took {datetime.timedelta(seconds=int(epoch_time))}: {job_rate:.1f} images/s{per_rank}"
    )
    return {
        "train_loss": meters.loss.avg,
        "lr": step_lr if step_lr is not None else state.optimizer.param_groups[0]["lr"],
        "grad_norm": meters.grad_norm.avg,
        "skipped_steps": meters.skipped_steps,
        "epoch_time": epoch_time,
        "images_per_s": job_rate,
        "steps_done": step + 1,
    }


class _EvalProgress:
    """Logs evaluation progress on this rank: batches done, images/s, ETA and the top-1 of its images so far."""

    def __init__(self, num_batches: int, print_freq: int, name: str, logger: logging.Logger) -> None:
        self.num_batches, self.print_freq, self.logger = num_batches, max(1, print_freq), logger
        self.prefix = f"Test ({name})" if name else "Test"
        self.ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.images = 0
        self.start = time.time()

    def update(self, batch: int, images: int, totals: torch.Tensor) -> None:
        """After batch ``batch`` (0-based) of ``images`` images; ``totals`` holds this rank's running counts."""
        self.images += images
        if batch % self.print_freq and batch != self.num_batches - 1:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        eta = datetime.timedelta(seconds=int(elapsed / (batch + 1) * (self.num_batches - batch - 1)))
        correct1, scored = totals[0].item(), totals[3].item()
        whose = "rank 0's" if self.ranks > 1 else "the"
        self.logger.info(
            f"{self.prefix}: [{batch + 1}/{self.num_batches}]\teta {eta}\t{self.images / elapsed:.1f} images/s"
            + (" per process" if self.ranks > 1 else "")
            + f"\tacc1 {100.0 * correct1 / max(scored, 1.0):.3f} over {whose} {int(scored)} images so far"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    logger: logging.Logger,
    print_freq: int = 10,
    name: str = "",
) -> dict:
    """Top-1/top-5 and loss over the whole split: per-rank sums all-reduced, every image counted once.

    Stand-ins for unreadable images (label ``IGNORED_LABEL``, with DATA.SKIP_CORRUPT) are left out and counted
    as ``num_skipped``. Every ``print_freq`` batches (and at the last) rank 0 logs its progress: batches done,
    images/s, ETA and the top-1 so far over its own images. ``name`` (e.g. 'EMA') labels the log lines.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, images, skipped
    progress = _EvalProgress(len(loader), print_freq, name, logger) if is_main_process() else None
    for batch, (samples, targets) in enumerate(loader):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            outputs = model(samples)
        scored = targets != IGNORED_LABEL
        outputs, targets = outputs[scored].float(), targets[scored]
        correct = accuracy_counts(outputs, targets, topk=(1, min(5, outputs.shape[1])))
        totals[:3] += torch.stack([correct[0], correct[1], criterion(outputs, targets)]).double()
        totals[3] += targets.numel()
        totals[4] += scored.numel() - targets.numel()
        if progress is not None:
            progress.update(batch, scored.numel(), totals)
    all_reduce_sum(totals)
    correct1, correct5, loss_sum, count, skipped = totals.tolist()
    count = max(count, 1.0)
    result = {
        "acc1": 100.0 * correct1 / count,
        "acc5": 100.0 * correct5 / count,
        "loss": loss_sum / count,
        "num_images": int(totals[3].item()),
    }
    if skipped:
        result["num_skipped"] = int(skipped)
    label = f"{name} " if name else ""
    logger.info(
        f" * {label}Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f} loss {result['loss']:.4f} "
        f"on {result['num_images']} images" + (f" ({int(skipped)} unreadable, left out)" if skipped else "")
    )
    return result


@torch.no_grad()
def measure_throughput(
    model: nn.Module,
    batch_size: int,
    img_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    logger: logging.Logger,
    warmup: int = 10,
    iterations: int = 30,
) -> float:
    """Inference images/s on synthetic input (no dataset needed): warm-up, then timed batches."""
    model.eval()
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    for _ in range(warmup):
        with autocast(device, amp_dtype):
            model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.time()
    for _ in range(iterations):
        with autocast(device, amp_dtype):
            model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    throughput = iterations * batch_size / (time.time() - start)
    logger.info(f"batch_size {batch_size} img_size {img_size}: throughput {throughput:.1f} images/s")
    return throughput
