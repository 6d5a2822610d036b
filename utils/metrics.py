"""Training statistics: running averages, exact top-k counts, and machine-readable logs.

Epoch statistics go to ``metrics.jsonl`` (one JSON object per line, next to the human log) and, with
per-step scalars, to TensorBoard under ``tb/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = ["AverageMeter", "MetricsWriter", "accuracy_counts"]


class AverageMeter:
    """The latest value and the running (weighted) average of a statistic."""

    def __init__(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        """Record ``val`` as the mean over ``n`` samples."""
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


@torch.no_grad()
def accuracy_counts(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many samples have their label among the ``k`` highest logits, for each ``k`` in ``topk``.

    Counts (int64, on ``output``'s device), not percentages, so ranks can sum them exactly before
    dividing. A ``k`` at or above the number of classes counts every sample.
    """
    max_k = min(max(topk), output.size(1))
    hits = output.topk(max_k, dim=1).indices.eq(target.view(-1, 1))  # (B, max_k)
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in topk])


def _json_value(value: Any) -> Any:
    """Turn tensors and numpy scalars into plain Python values for ``json.dumps``."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl")


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that TensorBoard can plot (numbers and 1-element tensors)."""
    scalars = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = value.item()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = value
    return scalars


class MetricsWriter:
    """Appends epoch records to ``output_dir/metrics.jsonl`` and scalars to ``output_dir/tb/``.

    With ``enabled=False`` (ranks other than 0) every method does nothing and no file is created.
    """

    def __init__(self, output_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = SummaryWriter(log_dir=os.path.join(output_dir, "tb")) if enabled else None

    def log_epoch(self, stats: Mapping[str, Any]) -> None:
        """Append ``stats`` (which must hold 'epoch') as one JSON line, and plot its numbers per epoch."""
        if not self.enabled:
            return
        if "epoch" not in stats:
            raise ValueError(f"epoch statistics need an 'epoch' entry, got keys {sorted(stats)}")
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(stats), default=_json_value) + "\n")
        epoch = int(stats["epoch"])
        for key, value in _scalars(stats).items():
            if key != "epoch":
                self._tb.add_scalar(f"epoch/{key}", value, epoch)
        self._tb.flush()

    def add_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Plot per-step values at ``step``, each under its key as tag (e.g. 'train/loss', 'train/lr')."""
        if not self.enabled:
            return
        for tag, value in _scalars(values).items():
            self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard files."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
