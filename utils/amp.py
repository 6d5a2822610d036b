"""Mixed precision: choosing the autocast dtype, and one helper for the backward/clip/step sequence.

bf16 needs no loss scaling; fp16 goes through ``torch.amp.GradScaler``. ``GradientStepper`` keeps
the two (and full precision) on a single code path, with gradient accumulation, in the manner of
Swin's ``NativeScalerWithGradNormCount``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from utils.errors import ConfigError
from utils.logger import get_logger

__all__ = ["GradientStepper", "resolve_amp_dtype"]

_logger = get_logger(__name__)

_NAMED_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_amp_dtype(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for AMP_DTYPE ``name`` on ``device``, or None for full precision.

    'auto' picks bf16 on CUDA devices that support it and full precision elsewhere.
    """
    key = name.lower()
    if key == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else None
    if key not in _NAMED_DTYPES:
        raise ConfigError(f"unknown AMP_DTYPE {name!r}; expected 'auto', {', '.join(map(repr, _NAMED_DTYPES))}")
    return _NAMED_DTYPES[key]


class GradientStepper:
    """Backward for every micro-batch; unscale, clip, step and zero the gradients on the last one.

    The caller divides the loss by the number of micro-batches the step accumulates (the epoch's last
    step may take fewer, see ``engine.accumulation_group``) and, under DDP, skips gradient
    synchronisation (``model.no_sync()``) on the micro-batches with ``update=False``.
    """

    def __init__(self, amp_dtype: torch.dtype | None, device: torch.device | str = "cuda") -> None:
        """Loss scaling is on only for fp16; ``device`` is where the model runs (fp16 is a CUDA feature)."""
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        clip_grad: float = 0.0,
        update: bool = True,
    ) -> torch.Tensor | None:
        """Backpropagate ``loss``; with ``update``, also take the optimizer step.

        Returns the norm of the full accumulated gradient before clipping (a 0-dim tensor; it is
        clipped to ``clip_grad`` when that is > 0), or None when no step was taken. With fp16 a step
        whose gradient overflowed is skipped by the scaler, and the returned norm is not finite.
        """
        self.scaler.scale(loss).backward()
        if not update:
            return None
        self.scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict[str, Any]:
        """The fp16 loss-scale state ({} when loss scaling is off)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss-scale state; states from a run with another precision are ignored."""
        if not self.scaler.is_enabled():
            return
        if not state:
            _logger.warning("checkpoint holds no fp16 loss-scale state; starting from the default scale")
            return
        self.scaler.load_state_dict(state)
