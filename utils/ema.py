"""Exponential moving average of a model's weights (evaluated and checkpointed beside the model)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """EMA copy of ``model``: ``ema = d * ema + (1 - d) * weights`` after every optimizer step.

    Kept instead of timm's ``ModelEmaV3``: its warmup is ``1 - (1 + t / gamma) ** -power``, not the
    ``(1 + n) / (10 + n)`` our checkpoints were trained with, so their EMA would not resume bit for bit.

    Only floating-point tensors are averaged; integer buffers are copied. With ``warmup`` the decay grows
    as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early weights do not dominate.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
