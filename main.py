"""Train or evaluate a Focal Transformer on ImageNet (or the embedded toy data).

    torchrun --nproc_per_node 8 main.py --cfg configs/focal_small.yaml --data-path /data/imagenet
    python main.py --cfg configs/focal_tiny.yaml --eval --resume focal-tiny-is.pth --data-path /data/imagenet

torchrun provides RANK / WORLD_SIZE / LOCAL_RANK; plain ``python main.py`` runs one process (CPU when
there is no GPU). Everything a run writes lands in <OUTPUT>/<MODEL.NAME>/<TAG>/.

Reliability: a run restarted with the same command resumes from the newest valid checkpoint and ends
bit for bit where an uninterrupted run would (what a checkpoint holds and which one is resumed: ``resume.py``).
SIGTERM, SIGUSR1 or SIGINT (Ctrl-C; a second one aborts) makes every rank finish its step, write a checkpoint
at that step and exit 0; torchrun forwards SIGTERM and SIGINT to the workers (add ``--signals-to-handle
SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`` for SIGUSR1, and raise ``--shutdown-timeout`` above 30 s if saving takes
longer). Bad input and failed collectives (``utils/errors.py``) end the run with a one-line error and exit status 1
(2 for command-line and config errors), the full traceback in the rank's log file; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from config import ConfigError, get_config
from data import build_loader
from data.resumable import resumable_sampler
from engine import EpochMeters, TrainState, evaluate, measure_throughput, train_one_epoch
from lr_scheduler import build_scheduler
from models import build_model
from optim import build_optimizer, scale_learning_rates
from resume import Trainer, keep_metrics_before, load_model_weights, resume, save_checkpoint
from utils.amp import GradientStepper, resolve_amp_dtype
from utils.checkpoint import CheckpointManager, write_text_atomic
from utils.distributed import (
    DistInfo,
    GradientSyncWatch,
    StopRequest,
    any_rank,
    cleanup,
    init_distributed,
)
from utils.ema import ModelEma
from utils.errors import CollectiveError, FocalError
from utils.logger import create_logger
from utils.metrics import MetricsWriter
from utils.runtime import configure_runtime

# Errors that mean bad input or a failed run rather than a bug: reported as one line, exit status 1; any other
# error keeps its traceback.
RUN_ERRORS = (FocalError, dist.DistError)
# A collective failed, usually because another rank died or timed out (DistError: NCCL's and the store's).
COLLECTIVE_ERRORS = (CollectiveError, dist.DistError)
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


def save_config(config, output: str) -> None:
    write_text_atomic(os.path.join(output, "config.yaml"), config.dump())


def _build_trainer(config, dist_info: DistInfo, model: nn.Module, logger: logging.Logger, stop: StopRequest) -> Trainer:
    device = dist_info.device
    data = build_loader(config, dist_info.rank, dist_info.world_size)
    model_without_ddp = model
    if dist_info.is_distributed:
        # No buffer broadcast before each forward: the model's buffers are constants derived from the config, and
        # a collective there would fail untyped (a plain RuntimeError under gloo) when another rank dies.
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    # gloo fails collectives with untyped RuntimeErrors (NCCL raises DistError subclasses itself).
    gloo = dist_info.is_distributed and dist.get_backend() == dist.Backend.GLOO
    gradient_sync = GradientSyncWatch().attach(model) if gloo else None
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
    ema = ModelEma(model_without_ddp, config.MODEL_EMA_DECAY, config.MODEL_EMA_WARMUP) if config.MODEL_EMA else None
    optimizer = build_optimizer(config, model_without_ddp)
    accumulation, batches = max(1, config.TRAIN.ACCUMULATION_STEPS), len(data.loader_train)
    if accumulation > batches:
        raise ConfigError(
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
        gradient_sync=gradient_sync,
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
        keep_metrics_before(trainer.metrics.jsonl_path, point.epoch, logger)
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
            save_checkpoint(trainer, epoch, train_stats["steps_done"], False, max_accuracy, meters)
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
        save_checkpoint(trainer, epoch, batches_per_epoch, True, max_accuracy, meters, is_best, periodic)
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
    """The model; a configuration it cannot be built for is a ConfigError that names the sizes involved."""
    try:
        return build_model(config)
    except (ValueError, ArithmeticError) as error:
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        focal = config.MODEL.FOCAL
        raise ConfigError(
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
    configure_runtime()
    if not (config.EVAL_MODE or config.THROUGHPUT_MODE):  # the training run's record: evaluations leave it as is
        if dist_info.rank == 0:
            save_config(config, config.OUTPUT)
        logger.info(f"full config saved to {os.path.join(config.OUTPUT, 'config.yaml')}")
    try:
        run(config, dist_info, logger)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one asked for a stop after the step, with a checkpoint)
        logger.error("interrupted by a second Ctrl-C: no checkpoint of this step; rerun the command to resume")
        return 130
    except RUN_ERRORS as error:  # anything else is a bug: it keeps its traceback
        message = one_line(error)
        if isinstance(error, COLLECTIVE_ERRORS):
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
