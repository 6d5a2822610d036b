"""Checkpoints of a training run and the rules for resuming one.

A checkpoint holds everything a bit-exact resume needs (model, optimizer, scheduler, loss scale, EMA, the
position within the epoch and every rank's RNG state and running averages). Which one a run continues from:

- with TRAIN.AUTO_RESUME the newest valid checkpoint of the run's own folder, which wins over MODEL.RESUME (the
  released trainer's rule: rerunning a command that names ``--resume`` continues the run);
- else MODEL.RESUME;
- a fine-tune (MODEL.PRETRAINED) only continues checkpoints of a fine-tune from the same file; with none it
  loads the pretrained weights (``models.finetune.load_pretrained``) and starts at TRAIN.START_EPOCH.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml
from torch import nn

from config import ConfigError
from data import DataBundle
from engine import EpochMeters, TrainState
from models import load_official_weights, load_pretrained
from utils.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint_file,
    restore_rng_state,
    write_text_atomic,
)
from utils.distributed import DistInfo, all_gather_objects, barrier, broadcast_object
from utils.ema import ModelEma
from utils.metrics import MetricsWriter


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
        load_official_weights(model, checkpoint)
    logger.info(f"loaded {'EMA ' if ema else ''}weights from {path}")
    return checkpoint


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


def save_checkpoint(
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


def find_checkpoint(trainer: Trainer) -> tuple[str, dict] | None:
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


def restore_rank_state(trainer: Trainer, checkpoint: dict, epoch_done: bool) -> EpochMeters | None:
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


def restart_ema(trainer: Trainer) -> None:
    """Start the EMA (when the run keeps one) from the model's current weights."""
    if trainer.state.ema is not None:
        config = trainer.config
        trainer.state.ema = ModelEma(trainer.model_without_ddp, config.MODEL_EMA_DECAY, config.MODEL_EMA_WARMUP)


def resume(trainer: Trainer) -> ResumePoint:
    """Load the checkpoint to resume from into the run, and return where to continue."""
    config, state, logger = trainer.config, trainer.state, trainer.logger
    found = find_checkpoint(trainer)
    if found is None:
        if config.MODEL.PRETRAINED:
            logger.info(f"fine-tuning from {config.MODEL.PRETRAINED} (weights only): no checkpoint to resume")
            load_pretrained(trainer.model_without_ddp, load_checkpoint_file(config.MODEL.PRETRAINED), logger)
            restart_ema(trainer)
        return ResumePoint(epoch=config.TRAIN.START_EPOCH)
    path, checkpoint = found[0], _checkpoint_dict(found[1], found[0])
    if config.MODEL.PRETRAINED:
        logger.info(f"continuing the fine-tune from its checkpoint {path} ({config.MODEL.PRETRAINED} is not reloaded)")
    load_official_weights(trainer.model_without_ddp, checkpoint)
    if "optimizer" not in checkpoint:
        logger.info(f"{path} holds weights only: training starts at epoch {config.TRAIN.START_EPOCH}")
        restart_ema(trainer)
        return ResumePoint(epoch=config.TRAIN.START_EPOCH)
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["lr_scheduler"])
    state.stepper.load_state_dict(checkpoint.get("scaler", {}))
    if state.ema is not None:
        if "model_ema" in checkpoint:
            state.ema.load_state_dict(checkpoint["model_ema"])
        else:
            logger.warning(f"{path} holds no EMA weights: the EMA restarts from the resumed weights")
            restart_ema(trainer)
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
    meters = restore_rank_state(trainer, checkpoint, epoch_done)
    point = ResumePoint(epoch, 0 if epoch_done else checkpoint["step"], checkpoint.get("max_accuracy", 0.0), meters)
    where = f"epoch {point.epoch}" + (f" step {point.step}" if point.step else "")
    logger.info(f"resumed from {path}: starting at {where}")
    return point


def keep_metrics_before(path: str, epoch: int, logger: logging.Logger) -> None:
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
