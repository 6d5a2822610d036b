"""Optimizer construction and learning-rate scaling for ImageNet training.

Weight decay follows the released Swin / Focal recipe: it is not applied to 1-D parameters (norm
weights), biases, or whatever the model lists through the timm-style ``no_weight_decay()`` (exact
names) and ``no_weight_decay_keywords()`` (substrings) hooks, such as position tables.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from yacs.config import CfgNode

from utils.errors import ConfigError
from utils.logger import get_logger

__all__ = ["build_optimizer", "param_groups_weight_decay", "scale_learning_rates"]

_logger = get_logger(__name__)

# The total batch at which TRAIN.BASE_LR, WARMUP_LR and MIN_LR are specified.
_REFERENCE_BATCH = 512.0


def _model_name_set(model: nn.Module, hook: str) -> set[str]:
    """The names a timm-style hook (``no_weight_decay`` / ``no_weight_decay_keywords``) returns, or none."""
    method = getattr(model, hook, None)
    return set(method()) if callable(method) else set()


def _skips_weight_decay(name: str, param: nn.Parameter, skip_names: set[str], skip_keywords: Iterable[str]) -> bool:
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name in skip_names
        or any(keyword in name for keyword in skip_keywords)
    )


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Kept instead of timm's function of the same name: timm has no ``no_weight_decay_keywords`` and puts the
    non-decayed group first, so the optimizer state of every existing checkpoint would no longer load.

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    skip_names = _model_name_set(model, "no_weight_decay")
    skip_keywords = _model_name_set(model, "no_weight_decay_keywords")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _skips_weight_decay(name, param, skip_names, skip_keywords):
            no_decay.append(param)
        else:
            decay.append(param)
    _logger.debug("weight decay on %d tensors, none on %d", len(decay), len(no_decay))
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(config: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by TRAIN.OPTIMIZER.NAME ('adamw' or 'sgd') over ``model``'s parameters.

    Pass the bare model (not the DDP or compiled wrapper) so parameter names match what
    ``no_weight_decay()`` returns. AdamW uses the fused CUDA kernel when every parameter is on CUDA.
    """
    opt_cfg = config.TRAIN.OPTIMIZER
    name = opt_cfg.NAME.lower()
    groups = param_groups_weight_decay(model, config.TRAIN.WEIGHT_DECAY)
    lr = config.TRAIN.BASE_LR
    if name == "adamw":
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(
            groups, lr=lr, betas=tuple(opt_cfg.BETAS), eps=opt_cfg.EPS, fused=True if on_cuda else None
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt_cfg.MOMENTUM, nesterov=True)
    raise ConfigError(f"unknown optimizer TRAIN.OPTIMIZER.NAME={opt_cfg.NAME!r}; expected 'adamw' or 'sgd'")


def scale_learning_rates(config: CfgNode, world_size: int) -> tuple[float, float, float]:
    """(base_lr, warmup_lr, min_lr) scaled linearly from a total batch of 512 to the actual one.

    The total batch is DATA.BATCH_SIZE x world size x accumulation steps, as in released Swin.
    """
    total_batch = config.DATA.BATCH_SIZE * world_size * max(1, config.TRAIN.ACCUMULATION_STEPS)
    factor = total_batch / _REFERENCE_BATCH
    train = config.TRAIN
    scaled = (train.BASE_LR * factor, train.WARMUP_LR * factor, train.MIN_LR * factor)
    _logger.info("total batch %d: lr scaled by %g to %s", total_batch, factor, scaled)
    return scaled
