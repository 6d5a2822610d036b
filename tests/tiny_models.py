"""A tiny FocalTransformer shared by the tests of the code built on top of the model (backbone, fine-tuning, tools)."""

from __future__ import annotations

from typing import Any

import torch

from models import FocalTransformer

# Stage maps 16/8/4/2 at 64 px against window 4: stages 2 and 3 use the whole map (shrunk windows).
TINY_FOCAL: dict[str, Any] = dict(
    img_size=64,
    patch_size=4,
    embed_dim=16,
    depths=(1, 2, 1, 1),
    num_heads=(1, 2, 2, 4),
    window_size=4,
    focal_levels=(2, 2, 2, 2),
    focal_windows=(3, 3, 3, 1),
    expand_sizes=(2, 2, 2, 2),
    num_classes=5,
)


def tiny_focal(seed: int = 0, **kwargs: Any) -> FocalTransformer:
    """A FocalTransformer of ``TINY_FOCAL`` with ``kwargs`` overriding it, initialised from ``seed``."""
    torch.manual_seed(seed)
    return FocalTransformer(**{**TINY_FOCAL, **kwargs})
