"""Process-wide runtime settings: the one place where the trainer and the tools change torch's global state."""

from __future__ import annotations

import torch


def configure_runtime() -> None:
    """Settings every training, evaluation and benchmark process runs with.

    Denormal floats (tiny gradients, fresh AdamW moments) make CPU kernels up to 10x slower; flushing them to
    zero has no effect on GPU.
    """
    torch.set_flush_denormal(True)
