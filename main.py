"""Train or evaluate a Focal Transformer on ImageNet (or the embedded toy data).

    torchrun --nproc_per_node 8 main.py --cfg configs/focal_small.yaml --data-path /data/imagenet
    python main.py --cfg configs/focal_tiny.yaml --eval --resume focal-tiny-is.pth --data-path /data/imagenet

torchrun provides RANK / WORLD_SIZE / LOCAL_RANK; plain ``python main.py`` runs one process (CPU when
there is no GPU). Everything a run writes lands in <OUTPUT>/<MODEL.NAME>/<TAG>/.
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
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from config import ConfigError, get_config
from data import build_loader
from engine import NonFiniteLossError, TrainState, evaluate, measure_throughput, train_one_epoch
from lr_scheduler import build_scheduler
from models import build_model, load_official_weights
from optim import build_optimizer, scale_learning_rates
from utils.amp import GradientStepper, resolve_amp_dtype
from utils.checkpoint import CheckpointManager, load_checkpoint_file
from utils.distributed import DistInfo, barrier, cleanup, init_distributed
from utils.logger import create_logger
from utils.metrics import MetricsWriter


class StrictArgumentParser(argparse.ArgumentParser):
    """argparse that names the closest valid flag when given an unknown one."""

    def error(self, message: str) -> None:
        if "unrecognized arguments" in message:
            flags = [opt for action in self._actions for opt in action.option_strings]
            for token in message.split(":", 1)[1].split():
                match = difflib.get_close_matches(token.split("=")[0], flags, n=1)
                if match:
                    message += f" (did you mean {match[0]}?)"
                    break
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = StrictArgumentParser("focal", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--cfg", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--opts", nargs="+", default=None, help="config overrides as KEY VALUE pairs")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--data-path", type=str, help="dataset root")
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


def load_model_weights(model: nn.Module, path: str, logger: logging.Logger) -> dict:
    """Load ``path`` (ours, or a released checkpoint / bare state dict) into ``model``; returns the checkpoint."""
    checkpoint = load_checkpoint_file(path)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    load_official_weights(model, state_dict)
    logger.info(f"loaded weights from {path}")
    return checkpoint


def save_config(config, output: str) -> None:
    with open(os.path.join(output, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config.dump())


def run(config, dist_info: DistInfo, logger: logging.Logger) -> None:
    device = dist_info.device
    amp_dtype = resolve_amp_dtype(config.AMP_DTYPE, device)
    model = build_model(config).to(device)
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} params")
    if hasattr(model, "flops"):
        logger.info(f"number of GFLOPs: {model.flops() / 1e9:.3f}")

    if config.THROUGHPUT_MODE:
        measure_throughput(model, config.DATA.BATCH_SIZE, config.DATA.IMG_SIZE, device, amp_dtype, logger)
        return

    data = build_loader(config, dist_info.rank, dist_info.world_size)
    if config.EVAL_MODE:
        if config.MODEL.RESUME:
            load_model_weights(model, config.MODEL.RESUME, logger)
        result = evaluate(model, data.loader_val, device, amp_dtype, logger)
        if dist_info.rank == 0:
            with open(os.path.join(config.OUTPUT, "eval_results.json"), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return

    model_without_ddp = model
    if dist_info.is_distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(config, model_without_ddp)
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    steps_per_epoch = len(data.loader_train) // accumulation
    base_lr, warmup_lr, min_lr = scale_learning_rates(config, dist_info.world_size)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, base_lr, warmup_lr, min_lr)
    stepper = GradientStepper(amp_dtype, device)
    metrics = MetricsWriter(config.OUTPUT, enabled=dist_info.rank == 0)
    state = TrainState(
        optimizer=optimizer,
        scheduler=scheduler,
        stepper=stepper,
        criterion=build_criterion(config, data.mixup_fn is not None),
        device=device,
        amp_dtype=amp_dtype,
        accumulation_steps=accumulation,
        clip_grad=config.TRAIN.CLIP_GRAD,
        print_freq=config.PRINT_FREQ,
        skip_nonfinite=config.TRAIN.SKIP_NONFINITE,
        metrics=metrics,
    )
    checkpoints = CheckpointManager(config.OUTPUT, keep=config.SAVE_KEEP, logger=logger)

    start_epoch, max_accuracy = config.TRAIN.START_EPOCH, 0.0
    resume_path, checkpoint = config.MODEL.RESUME, None
    if not resume_path and config.TRAIN.AUTO_RESUME:
        found = checkpoints.latest_valid()
        if found is not None:
            resume_path, checkpoint = found
            logger.info(f"auto-resuming from {resume_path}")
    if resume_path:
        checkpoint = checkpoint or load_checkpoint_file(resume_path)
        load_official_weights(model_without_ddp, checkpoint["model"] if "model" in checkpoint else checkpoint)
        if "optimizer" in checkpoint and not config.EVAL_MODE:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["lr_scheduler"])
            stepper.load_state_dict(checkpoint.get("scaler", {}))
            start_epoch = checkpoint["epoch"] + 1
            state.global_step = checkpoint.get("global_step", start_epoch * steps_per_epoch)
            max_accuracy = checkpoint.get("max_accuracy", 0.0)
        logger.info(f"resumed from {resume_path}: starting at epoch {start_epoch}")
    elif config.MODEL.PRETRAINED:
        from models.finetune import load_pretrained

        load_pretrained(model_without_ddp, load_checkpoint_file(config.MODEL.PRETRAINED), logger)

    logger.info("start training")
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        data.sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, data.loader_train, state, epoch, config.TRAIN.EPOCHS, data.mixup_fn, logger
        )
        result = evaluate(model, data.loader_val, device, amp_dtype, logger)
        is_best = result["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, result["acc1"])
        if dist_info.rank == 0:
            checkpoints.save(
                {
                    "model": model_without_ddp.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "scaler": stepper.state_dict(),
                    "epoch": epoch,
                    "global_step": state.global_step,
                    "max_accuracy": max_accuracy,
                    "config": config.dump(),
                },
                epoch=epoch,
                is_best=is_best,
                periodic=(epoch + 1) % config.SAVE_FREQ == 0 or epoch + 1 == config.TRAIN.EPOCHS,
            )
        barrier()
        row = {"epoch": epoch, **train_stats, **result, "max_acc1": max_accuracy}
        logger.info(f"epoch {epoch}: acc1 {result['acc1']:.2f}% (max {max_accuracy:.2f}%)")
        metrics.log_epoch(row)
    metrics.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = get_config(args)
    except ConfigError as error:
        sys.stderr.write(f"focal: error: {error}\n")
        return 2
    dist_info = init_distributed()
    config.defrost()
    config.LOCAL_RANK = dist_info.local_rank
    config.freeze()
    os.makedirs(config.OUTPUT, exist_ok=True)
    logger = create_logger(config.OUTPUT, dist_rank=dist_info.rank, name="focal")
    seed_everything(config.SEED + dist_info.rank)
    if dist_info.rank == 0:
        save_config(config, config.OUTPUT)
    logger.info(f"full config saved to {os.path.join(config.OUTPUT, 'config.yaml')}")
    try:
        run(config, dist_info, logger)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as error:
        logger.error(f"{type(error).__name__}: {error}")
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
