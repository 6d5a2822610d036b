"""Train or evaluate a Focal Transformer on ImageNet (or the embedded toy data).

    torchrun --nproc_per_node 8 main.py --cfg configs/focal_small.yaml --data-path /data/imagenet
    python main.py --cfg configs/focal_tiny.yaml --eval --resume focal-tiny-is.pth --data-path /data/imagenet

torchrun provides RANK / WORLD_SIZE / LOCAL_RANK; plain ``python main.py`` runs one process (CPU when
there is no GPU). Everything a run writes lands in <OUTPUT>/<MODEL.NAME>/<TAG>/.

Reliability: a run restarted with the same command resumes from the newest valid checkpoint and ends
bit for bit where an uninterrupted run would (the checkpoint holds the model, optimizer, scheduler,
loss scale, position within the epoch and every rank's RNG state). SIGTERM or SIGUSR1 makes every
rank finish its step, write a checkpoint at that step and exit 0; torchrun forwards SIGTERM to the
workers (add ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` for SIGUSR1, and raise
``--shutdown-timeout`` above 30 s if saving takes longer). Bad input ends the run with a one-line error
and exit status 1 (2 for command-line and config errors); the full traceback goes to the rank's log file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from config import ConfigError, get_config
from data import DataBundle, build_loader
from data.resumable import resumable_sampler
from engine import EpochMeters, NonFiniteLossError, TrainState, evaluate, measure_throughput, train_one_epoch
from lr_scheduler import build_scheduler
from models import build_model, load_official_weights, load_pretrained
from optim import build_optimizer, scale_learning_rates
from utils.amp import GradientStepper, resolve_amp_dtype
from utils.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint_file,
    restore_rng_state,
    write_text_atomic,
)
from utils.distributed import (
    DistInfo,
    StopRequest,
    all_gather_objects,
    any_rank,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
)
from utils.ema import ModelEma
from utils.logger import create_logger
from utils.metrics import MetricsWriter

# Errors that mean bad input or a failed run rather than a bug: reported as one line, exit status 1.
# (DistError: a collective failed, usually because another rank died or timed out.)
RUN_ERRORS = (ValueError, OSError, NonFiniteLossError, CheckpointError, dist.DistError)
# A message longer than this (e.g. from a collective's C++ backend) is cut in the one-line report.
_MAX_ERROR_CHARS = 2000


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse that names the closest valid flag when given an unknown one, and errors in one line."""

    def error(self, message: str) -> None:
        if "unrecognized arguments" in message:
            flags = [opt for action in self._actions for opt in action.option_strings]
            for token in message.split(":", 1)[1].split():
                match = difflib.get_close_matches(token.split("=")[0], flags, n=1)
                if match:
                    message += f" (did you mean {match[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")  # one line, no usage block


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser("focal", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument(
        "--opts", nargs="+", action="extend", default=None, help="config overrides as KEY VALUE pairs (repeatable)"
    )
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="dataset root")
    parser.add_argument("--dataset", choices=["imagenet", "toy"], help="DATA.DATASET (released flag)")
    parser.add_argument("--zip", action="store_true", help="read the zip layout (train.zip + train_map.txt)")
    parser.add_argument("--cache-mode", choices=["no", "part", "full"], help="zip-mode caching")
    parser.add_argument("--pretrained", help="checkpoint to fine-tune from (weights only)")
    parser.add_argument("--resume", help="checkpoint to resume from, or to evaluate with --eval")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing")
    parser.add_argument("--amp-dtype", choices=["auto", "bf16", "fp16", "none"], help="mixed precision")
    parser.add_argument("--amp-opt-level", choices=["O0", "O1", "O2"], help="released flag: O0 = no mixed precision")
    parser.add_argument("--output", metavar="PATH", help="output root")
    parser.add_argument("--tag", help="run tag")
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--throughput", action="store_true", help="measure throughput only")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="how long a collective waits for the other ranks before the job fails (default 1800)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_criterion(config, mixup_active: bool) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # label smoothing is folded into Mixup's targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def _checkpoint_dict(checkpoint: Any, path: str) -> dict:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of tensors")
    return checkpoint


def load_model_weights(model: nn.Module, path: str, logger: logging.Logger, ema: bool = False) -> dict:
    """Load ``path`` (ours, a released checkpoint, a bare state dict or .safetensors) into ``model``.

    With ``ema`` the checkpoint's EMA weights are loaded instead (an error when it holds none).
    """
    checkpoint = _checkpoint_dict(load_checkpoint_file(path), path)
    if ema:
        if "model_ema" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} holds no EMA weights (trained without MODEL_EMA)")
        load_official_weights(model, checkpoint["model_ema"]["model"])
    else:
        load_official_weights(model, checkpoint.get("model", checkpoint))
    logger.info(f"loaded {'EMA ' if ema else ''}weights from {path}")
    return checkpoint


def save_config(config, output: str) -> None:
    write_text_atomic(os.path.join(output, "config.yaml"), config.dump())


@dataclass
class Trainer:
    """The objects of a training run that a checkpoint saves and restores."""

    config: Any
    dist_info: DistInfo
    model: nn.Module  # wrapped in DDP when distributed
    model_without_ddp: nn.Module
    data: DataBundle
    state: TrainState
    checkpoints: CheckpointManager
    metrics: MetricsWriter
    logger: logging.Logger


@dataclass
class ResumePoint:
    """Where training (re)starts: the first step of ``epoch`` not done yet, and the averages so far."""

    epoch: int = 0
    step: int = 0  # batches of ``epoch`` already done (non-zero after a mid-epoch stop)
    max_accuracy: float = 0.0
    meters: EpochMeters | None = None  # this rank's averages over those batches


def _save_checkpoint(
    trainer: Trainer,
    epoch: int,
    step: int,
    epoch_done: bool,
    max_accuracy: float,
    meters: EpochMeters,
    is_best: bool = False,
    periodic: bool = False,
) -> None:
    """Write everything a bit-exact resume needs; every rank's RNG state and averages are gathered to rank 0.

    ``step`` is the number of batches of ``epoch`` done (``CheckpointManager.latest_valid`` ranks
    checkpoints by epoch, then step); ``epoch_done`` says whether evaluation and the metrics row of
    ``epoch`` are done too. Collective: every rank must call it.
    """
    config, state = trainer.config, trainer.state
    rank_states = all_gather_objects({"rng": capture_rng_state(), "meters": meters.state_dict()})
    if trainer.dist_info.rank == 0:
        trainer.checkpoints.save(
            {
                "model": trainer.model_without_ddp.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "lr_scheduler": state.scheduler.state_dict(),
                "scaler": state.stepper.state_dict(),
                "epoch": epoch,
                "step": step,
                "epoch_done": epoch_done,
                "global_step": state.global_step,
                "max_accuracy": max_accuracy,
                **({"model_ema": state.ema.state_dict()} if state.ema is not None else {}),
                # The training order and every random number are functions of (seed, epoch, step).
                "seed": config.SEED,
                "world_size": trainer.dist_info.world_size,
                "batch_size": config.DATA.BATCH_SIZE,
                "rank_states": rank_states,
                "config": config.dump(),
            },
            epoch=epoch,
            is_best=is_best,
            periodic=periodic,
        )
    barrier()


def _find_checkpoint(trainer: Trainer) -> tuple[str, dict] | None:
    """The checkpoint to resume from: with AUTO_RESUME the newest valid one of the run's own folder, else
    MODEL.RESUME. The run's own checkpoints win over MODEL.RESUME (as in the released trainer), so rerunning a
    command that names ``--resume`` continues the run instead of going back to that file.

    Rank 0 picks the file and the others load the same one. A fine-tune (MODEL.PRETRAINED) only resumes
    checkpoints it wrote itself: another run's checkpoint is refused (ConfigError), never continued by accident.
    """
    config, logger = trainer.config, trainer.logger
    found = None
    if config.TRAIN.AUTO_RESUME:
        latest = trainer.checkpoints.latest_valid() if trainer.dist_info.rank == 0 else None
        path = broadcast_object(latest[0] if latest else None)
        if path is not None:
            if config.MODEL.RESUME:
                logger.warning(
                    f"the run folder holds {path}: resuming from it instead of MODEL.RESUME {config.MODEL.RESUME} "
                    "(TRAIN.AUTO_RESUME False resumes from MODEL.RESUME)"
                )
            logger.info(f"auto-resuming from {path}")
            found = path, latest[1] if latest else load_checkpoint_file(path)
    if found is None and config.MODEL.RESUME:
        found = config.MODEL.RESUME, load_checkpoint_file(config.MODEL.RESUME)
    if found is not None and config.MODEL.PRETRAINED:
        _check_fine_tune_resumes_itself(config, *found)
    return found


def _fine_tuned_from(checkpoint: Any) -> str:
    """MODEL.PRETRAINED of the run that wrote ``checkpoint`` ('' when none, or the checkpoint does not say)."""
    saved = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    try:
        saved = yaml.safe_load(saved) if isinstance(saved, str) else None
    except yaml.YAMLError:
        return ""
    model = saved.get("MODEL") if isinstance(saved, dict) else None
    return (model.get("PRETRAINED") or "") if isinstance(model, dict) else ""


def _check_fine_tune_resumes_itself(config, path: str, checkpoint: Any) -> None:
    """A run started with MODEL.PRETRAINED may only continue from a checkpoint of a fine-tune from that file."""
    pretrained, written_by = config.MODEL.PRETRAINED, _fine_tuned_from(checkpoint)
    if written_by and os.path.realpath(written_by) == os.path.realpath(pretrained):
        return
    origin = f"a fine-tune from {written_by}" if written_by else "a run without --pretrained"
    if path == config.MODEL.RESUME:
        raise ConfigError(
            f"--pretrained {pretrained} and --resume {path} (written by {origin}) name two starting points: "
            "pass --pretrained to start a fine-tune, or --resume to continue a run"
        )
    raise ConfigError(
        f"--pretrained {pretrained}: the run folder {config.OUTPUT} already holds {path}, written by {origin}; "
        "fine-tune into a new folder (--tag NAME or --output PATH), or drop --pretrained to continue that run"
    )


def _restore_rank_state(trainer: Trainer, checkpoint: dict, epoch_done: bool) -> EpochMeters | None:
    """Restore this rank's RNG state (and, mid-epoch, its averages) when the world size is unchanged."""
    rank_states = checkpoint.get("rank_states")
    world_size, rank = trainer.dist_info.world_size, trainer.dist_info.rank
    if not rank_states:
        return None
    if len(rank_states) != world_size:
        trainer.logger.warning(
            f"checkpoint was written by {len(rank_states)} processes, resuming with {world_size}: "
            "random numbers and the data split differ from an uninterrupted run"
        )
        return None
    restore_rng_state(rank_states[rank]["rng"])
    if epoch_done:
        return None
    meters = EpochMeters()
    meters.load_state_dict(rank_states[rank]["meters"])
    return meters


def _restart_ema(trainer: Trainer) -> None:
    """Start the EMA (when the run keeps one) from the model's current weights."""
    if trainer.state.ema is not None:
        config = trainer.config
        trainer.state.ema = ModelEma(trainer.model_without_ddp, config.MODEL_EMA_DECAY, config.MODEL_EMA_WARMUP)


def resume(trainer: Trainer) -> ResumePoint:
    """Load the checkpoint to resume from into the run, and return where to continue."""
    config, state, logger = trainer.config, trainer.state, trainer.logger
    found = _find_checkpoint(trainer)
    if found is None:
        if config.MODEL.PRETRAINED:
            logger.info(f"fine-tuning from {config.MODEL.PRETRAINED} (weights only): no checkpoint to resume")
            load_pretrained(trainer.model_without_ddp, load_checkpoint_file(config.MODEL.PRETRAINED), logger)
            _restart_ema(trainer)
        return ResumePoint(epoch=config.TRAIN.START_EPOCH)
    path, checkpoint = found[0], _checkpoint_dict(found[1], found[0])
    if config.MODEL.PRETRAINED:
        logger.info(f"continuing the fine-tune from its checkpoint {path} ({config.MODEL.PRETRAINED} is not reloaded)")
    load_official_weights(trainer.model_without_ddp, checkpoint.get("model", checkpoint))
    if "optimizer" not in checkpoint:
        logger.info(f"{path} holds weights only: training starts at epoch {config.TRAIN.START_EPOCH}")
        _restart_ema(trainer)
        return ResumePoint(epoch=config.TRAIN.START_EPOCH)
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    state.stepper.load_state_dict(checkpoint.get("scaler", {}))
    if state.ema is not None:
        if "model_ema" in checkpoint:
            state.ema.load_state_dict(checkpoint["model_ema"])
        else:
            logger.warning(f"{path} holds no EMA weights: the EMA restarts from the resumed weights")
            _restart_ema(trainer)
    epoch_done = checkpoint.get("epoch_done", True)  # checkpoints of other trainers: end of an epoch
    epoch = checkpoint["epoch"] + (1 if epoch_done else 0)
    state.global_step = checkpoint.get(
        "global_step", epoch * -(-len(trainer.data.loader_train) // state.accumulation_steps)
    )
    for key, name, value in (("seed", "SEED", config.SEED), ("batch_size", "DATA.BATCH_SIZE", config.DATA.BATCH_SIZE)):
        if checkpoint.get(key, value) != value:
            logger.warning(
                f"checkpoint was written with {name} {checkpoint[key]}, resuming with {value}: "
                "the data order and random numbers differ from an uninterrupted run"
            )
    meters = _restore_rank_state(trainer, checkpoint, epoch_done)
    point = ResumePoint(epoch, 0 if epoch_done else checkpoint["step"], checkpoint.get("max_accuracy", 0.0), meters)
    where = f"epoch {point.epoch}" + (f" step {point.step}" if point.step else "")
    logger.info(f"resumed from {path}: starting at {where}")
    return point


def _keep_metrics_before(path: str, epoch: int, logger: logging.Logger) -> None:
    """Drop the rows of ``epoch`` and later from metrics.jsonl (they are redone), and unreadable lines."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < epoch:
            kept.append(line)
    if len(kept) != len(lines):
        logger.info(f"metrics.jsonl: dropped {len(lines) - len(kept)} rows from epoch {epoch} on (redone)")
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _build_trainer(config, dist_info: DistInfo, model: nn.Module, logger: logging.Logger, stop: StopRequest) -> Trainer:
    device = dist_info.device
    data = build_loader(config, dist_info.rank, dist_info.world_size)
    model_without_ddp = model
    if dist_info.is_distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
    ema = ModelEma(model_without_ddp, config.MODEL_EMA_DECAY, config.MODEL_EMA_WARMUP) if config.MODEL_EMA else None
    optimizer = build_optimizer(config, model_without_ddp)
    accumulation, batches = max(1, config.TRAIN.ACCUMULATION_STEPS), len(data.loader_train)
    if accumulation > batches:
        raise ValueError(
            f"TRAIN.ACCUMULATION_STEPS {accumulation} is more than the {batches} batches of an epoch: "
            "not one full optimizer step per epoch"
        )
    steps_per_epoch = -(-batches // accumulation)  # the last step of an epoch takes the remainder (engine)
    if batches % accumulation:
        logger.warning(
            f"TRAIN.ACCUMULATION_STEPS {accumulation} does not divide the {batches} batches of an epoch: the last of "
            f"its {steps_per_epoch} optimizer steps accumulates the remaining {batches % accumulation}"
        )
    base_lr, warmup_lr, min_lr = scale_learning_rates(config, dist_info.world_size)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, base_lr, warmup_lr, min_lr)
    amp_dtype = resolve_amp_dtype(config.AMP_DTYPE, device)
    metrics = MetricsWriter(config.OUTPUT, enabled=dist_info.rank == 0)
    state = TrainState(
        optimizer=optimizer,
        scheduler=scheduler,
        stepper=GradientStepper(amp_dtype, device),
        criterion=build_criterion(config, data.mixup_fn is not None),
        device=device,
        amp_dtype=amp_dtype,
        accumulation_steps=accumulation,
        clip_grad=config.TRAIN.CLIP_GRAD,
        print_freq=config.PRINT_FREQ,
        skip_nonfinite=config.TRAIN.SKIP_NONFINITE,
        metrics=metrics,
        stop_requested=stop,
        seed=config.SEED,
        rank=dist_info.rank,
        ema=ema,
    )
    checkpoints = CheckpointManager(config.OUTPUT, keep=config.SAVE_KEEP, logger=logger)
    return Trainer(config, dist_info, model, model_without_ddp, data, state, checkpoints, metrics, logger)


def _log_stop(stop: StopRequest, where: str, logger: logging.Logger) -> None:
    cause = stop.received.name if stop.received else "another rank"
    logger.info(f"stopped on request ({cause}) {where}; checkpoint saved, rerun the same command to resume")


def train(config, dist_info: DistInfo, model: nn.Module, logger: logging.Logger, stop: StopRequest) -> None:
    """Train from the newest checkpoint (if any) to TRAIN.EPOCHS, or until a stop is requested."""
    trainer = _build_trainer(config, dist_info, model, logger, stop)
    model, data, state = trainer.model, trainer.data, trainer.state
    sampler = resumable_sampler(data.loader_train)
    batches_per_epoch = len(data.loader_train)
    point = resume(trainer)
    if dist_info.rank == 0:
        _keep_metrics_before(trainer.metrics.jsonl_path, point.epoch, logger)
    max_accuracy = point.max_accuracy
    if point.epoch >= config.TRAIN.EPOCHS:
        logger.info(
            f"nothing to train: the run has done its {config.TRAIN.EPOCHS} epochs (TRAIN.EPOCHS); "
            "raise TRAIN.EPOCHS to train further"
        )
    else:
        logger.info(f"start training at epoch {point.epoch} of {config.TRAIN.EPOCHS}")
    for epoch in range(point.epoch, config.TRAIN.EPOCHS):
        resumed = epoch == point.epoch
        start_step = point.step if resumed else 0
        meters = point.meters if resumed and point.meters is not None else EpochMeters()
        sampler.set_epoch(epoch, start=start_step * config.DATA.BATCH_SIZE)  # skips done batches unread
        train_stats = train_one_epoch(
            model, data.loader_train, state, epoch, config.TRAIN.EPOCHS, data.mixup_fn, logger, start_step, meters
        )
        if state.stopped and train_stats["steps_done"] < batches_per_epoch:
            _save_checkpoint(trainer, epoch, train_stats["steps_done"], False, max_accuracy, meters)
            _log_stop(stop, f"at epoch {epoch} step {train_stats['steps_done']} of {batches_per_epoch}", logger)
            break
        result = evaluate(model, data.loader_val, state.device, state.amp_dtype, logger, config.PRINT_FREQ)
        is_best = result["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, result["acc1"])
        logger.info(f"epoch {epoch}: acc1 {result['acc1']:.2f}% (max {max_accuracy:.2f}%)")
        if state.ema is not None:
            result_ema = evaluate(
                state.ema.module, data.loader_val, state.device, state.amp_dtype, logger, config.PRINT_FREQ, "EMA"
            )
            result.update({f"{key}_ema": value for key, value in result_ema.items() if key.startswith(("acc", "loss"))})
        if config.DATA.SKIP_CORRUPT:
            skipped = result["num_skipped_train"] = data.dataset_train.num_skipped
            if skipped:
                logger.warning(f"{skipped} unreadable training images skipped so far by this process")
        # The row goes first: a kill between the two redoes the epoch, whose row resume then drops.
        trainer.metrics.log_epoch({"epoch": epoch, **train_stats, **result, "max_acc1": max_accuracy})
        periodic = (epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS
        _save_checkpoint(trainer, epoch, batches_per_epoch, True, max_accuracy, meters, is_best, periodic)
        if epoch + 1 < config.TRAIN.EPOCHS and (state.stopped or any_rank(stop(), state.device)):
            _log_stop(stop, f"after epoch {epoch}", logger)
            break
    trainer.metrics.close()


def evaluate_checkpoint(config, dist_info: DistInfo, model: nn.Module, logger: logging.Logger) -> None:
    """--eval: load MODEL.RESUME (before reading any data, so a bad file fails fast), evaluate, save results."""
    load_model_weights(model, config.MODEL.RESUME, logger, ema=config.EVAL_EMA)
    data = build_loader(config, dist_info.rank, dist_info.world_size, train=False)  # the val split alone
    amp_dtype = resolve_amp_dtype(config.AMP_DTYPE, dist_info.device)
    result = evaluate(model, data.loader_val, dist_info.device, amp_dtype, logger, config.PRINT_FREQ)
    if dist_info.rank == 0:
        _record_evaluation(config, result)


def _record_evaluation(config, result: dict) -> None:
    """Name what was scored beside the scores: ``eval_results.json`` holds the latest evaluation, and every
    evaluation is appended to ``eval_results.jsonl``, so earlier ones (and the run's own files) are kept."""
    record = {
        "checkpoint": os.path.abspath(config.MODEL.RESUME),
        "ema": bool(config.EVAL_EMA),
        "img_size": config.DATA.IMG_SIZE,
        "crop": bool(config.TEST.CROP),
        **result,
    }
    write_text_atomic(os.path.join(config.OUTPUT, "eval_results.json"), json.dumps(record, indent=2))
    with open(os.path.join(config.OUTPUT, "eval_results.jsonl"), "a", encoding="utf-8") as history:
        history.write(json.dumps(record) + "\n")


def _build_model(config) -> nn.Module:
    """The model; a configuration it cannot be built for is a ValueError that names the sizes involved."""
    try:
        return build_model(config)
    except (ValueError, ArithmeticError) as error:
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        focal = config.MODEL.FOCAL
        raise ValueError(
            f"cannot build {config.MODEL.NAME} for DATA.IMG_SIZE {config.DATA.IMG_SIZE}, MODEL.FOCAL.PATCH_SIZE "
            f"{focal.PATCH_SIZE}, MODEL.FOCAL.WINDOW_SIZE {focal.WINDOW_SIZE}: {reason}"
        ) from error


def run(config, dist_info: DistInfo, logger: logging.Logger) -> None:
    device = dist_info.device
    model = _build_model(config).to(device)  # before any data: a config the model cannot take fails here
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} params")
    if hasattr(model, "flops"):
        logger.info(f"number of GFLOPs: {model.flops() / 1e9:.3f}")
    if config.THROUGHPUT_MODE:
        amp_dtype = resolve_amp_dtype(config.AMP_DTYPE, device)
        measure_throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, device, amp_dtype, logger)
    elif config.EVAL_MODE:
        evaluate_checkpoint(config, dist_info, model, logger)
    else:
        with StopRequest() as stop:  # installed before the loader starts workers, which inherit it
            train(config, dist_info, model, logger, stop)


def one_line(error: BaseException) -> str:
    """``error`` as one line: 'Type: message', or the original error of one re-raised from a loader worker."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Original Traceback"):
        text = lines[-1]  # "module.Type: message" as the worker raised it
    else:
        text = f"{type(error).__name__}: {' '.join(lines)}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _is_collective_failure(error: RuntimeError) -> bool:
    """A collective broke (gloo and NCCL raise plain RuntimeErrors when a peer dies or times out)."""
    text = str(error)
    return dist.is_initialized() and any(marker in text for marker in ("gloo", "NCCL", "Connection closed by peer"))


def _load_config(args: argparse.Namespace):
    """The run's config; ConfigError (one line) for unknown keys, wrong types and unreadable files."""
    try:
        return get_config(args)
    except yaml.YAMLError as error:  # e.g. a python/object tag, refused by yaml.safe_load
        detail = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConfigError(f"cannot read config file (plain YAML only, no Python tags): {detail}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load_config(args)
    except ConfigError as error:
        sys.stderr.write(f"focal: error: {error}\n")
        return 2
    if args.dist_timeout <= 0:
        sys.stderr.write(f"focal: error: --dist-timeout must be > 0 seconds, got {args.dist_timeout}\n")
        return 2
    dist_info = init_distributed(timeout_s=args.dist_timeout)
    config.defrost()
    config.LOCAL_RANK = dist_info.local_rank
    config.freeze()
    os.makedirs(config.OUTPUT, exist_ok=True)
    logger = create_logger(config.OUTPUT, dist_rank=dist_info.rank, name="focal")
    seed_everything(config.SEED + dist_info.rank)
    # Denormal floats (tiny gradients, fresh AdamW moments) make CPU kernels up to 10x slower; no effect on GPU.
    torch.set_flush_denormal(True)
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):  # the training run's record: evaluations leave it as is
        if dist_info.rank == 0:
            save_config(config, config.OUTPUT)
        logger.info(f"full config saved to {os.path.join(config.OUTPUT, 'config.yaml')}")
    try:
        run(config, dist_info, logger)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one asked for a stop after the step, with a checkpoint)
        logger.error("interrupted by a second Ctrl-C: no checkpoint of this step; rerun the command to resume")
        return 130
    except (*RUN_ERRORS, RuntimeError) as error:
        if not isinstance(error, RUN_ERRORS) and not _is_collective_failure(error):
            raise  # a bug: keep the traceback
        message = one_line(error)
        if not isinstance(error, RUN_ERRORS) or isinstance(error, dist.DistError):
            message = f"a collective failed, most likely because another rank failed (see its log): {message}"
        logger.debug("traceback of the error below", exc_info=True)  # the log file only
        logger.error(message)
        if dist_info.rank != 0:  # only rank 0 logs to the console
            sys.stderr.write(f"focal: error on rank {dist_info.rank}: {message}\n")
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
