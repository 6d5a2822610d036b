"""Fine-tuning from a checkpoint of another image size, window size or number of classes.

``adapt_state_dict`` turns a checkpoint state dict (ours, or the released layout with its derived
buffers) into one that loads into a model built with other settings; ``load_pretrained`` loads it and
names the keys that keep their fresh initialisation. Only the tensors whose shape follows the window or
the token grid are resized; the rest must match exactly.

How each kind of tensor is resized (one choice per kind, in the spirit of Swin's fine-tuning loader):

- ``relative_position_bias_table`` ((2ws-1)^2, nH): per head, a (2ws-1) x (2ws-1) grid of relative
  offsets, bicubic (``align_corners=False``, as Swin), so the zero offset stays at the centre.
- ``relative_position_bias_table_to_windows.k`` (nH, S^2) with S = ws + K_k - 1: per head, an S x S grid,
  bicubic.
- ``relative_position_bias_table_to_neighbors`` (1, nH, ws^2, n_ring): a dense table, queries x ring keys.
  Ring axis first: each target ring key takes the value of the geometrically nearest source ring key
  (``ring_source_index``; offsets outside the window keep their distance to the window's edge, offsets
  along the window's span are scaled with the window), then the query axis is resized bicubically as a
  ws x ws grid. Queries and keys are mapped independently; the bias of a (query, key) pair is therefore
  only approximately carried over when ws changes, which fine-tuning corrects.
- fc pooling ``pool_layers.k.weight`` (1, cell^2) and conv pooling (C, 1, cell, cell): per channel a
  cell x cell grid, bicubic, scaled by (old cell / new cell)^2 and then shifted uniformly so that the sum
  of the weights (the response of the pooling to a constant map) is exactly preserved.
- ``absolute_pos_embed`` (1, N, C): a sqrt(N) x sqrt(N) grid, bicubic.
- ``head.*`` of another shape: dropped, so the model keeps its fresh head.
- A ring table the source block did not have (its window covered the whole map at the source size) keeps
  its fresh initialisation; a ring table the target block does not have is dropped.

Derived buffers (``checkpoint_loading.RELEASED_BUFFER_NAME``: ``relative_position_index``, ``valid_ind_rolled``,
``attn_mask``, ``relative_position_index_k``, ``valid_ind_unfold_k``) are always dropped: the target model rebuilds
them from its configuration.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint_loading import RELEASED_BUFFER_NAME, CheckpointMismatchError, key_problems, unwrap_state_dict
from .focal_geometry import ring_offsets
from .focal_transformer import resize_pos_embed

_WINDOW_TABLE = re.compile(r"\.relative_position_bias_table$")
_POOLED_TABLE = re.compile(r"\.relative_position_bias_table_to_windows\.\d+$")
_RING_TABLE = re.compile(r"\.relative_position_bias_table_to_neighbors$")
_POOL_WEIGHT = re.compile(r"\.pool_layers\.\d+\.weight$")
_HEAD = re.compile(r"^head\.")

_logger = logging.getLogger(__name__)


# ---- pure resizing helpers ------------------------------------------------------------------------------
def resize_grids(grids: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of square grids (..., s, s) -> (..., size, size); the identity when s == size."""
    if grids.shape[-1] == size and grids.shape[-2] == size:
        return grids
    lead = grids.shape[:-2]
    work_dtype = torch.float64 if grids.dtype == torch.float64 else torch.float32  # no half-precision bicubic
    flat = grids.reshape(1, -1, *grids.shape[-2:]).to(work_dtype)
    out = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False)
    return out.reshape(*lead, size, size).to(grids.dtype)


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointMismatchError(f"{what}: {n} entries do not form a square grid")
    return side


def resize_window_bias_table(table: torch.Tensor, num_entries: int) -> torch.Tensor:
    """In-window table ((2ws-1)^2, nH) -> (num_entries, nH), a square grid of offsets per head."""
    side = _square_side(table.shape[0], "relative_position_bias_table")
    new_side = _square_side(num_entries, "target relative_position_bias_table")
    grids = table.t().reshape(-1, side, side)  # (nH, 2ws-1, 2ws-1)
    return resize_grids(grids, new_side).reshape(-1, num_entries).t().contiguous()


def resize_pooled_bias_table(table: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Pooled-level table (nH, S^2) -> (nH, num_entries), a square grid per head."""
    side = _square_side(table.shape[1], "relative_position_bias_table_to_windows")
    new_side = _square_side(num_entries, "target relative_position_bias_table_to_windows")
    return resize_grids(table.reshape(-1, side, side), new_side).reshape(-1, num_entries)


def expand_size_of_ring(window_size: int, n_ring: int) -> int:
    """The expand size e with 4 ws^2 - 4 (ws - e)^2 == n_ring (the inverse of ``ring_size``)."""
    inner = window_size**2 - n_ring // 4
    side = math.isqrt(max(inner, 0))
    if n_ring % 4 or inner < 0 or side * side != inner:
        raise CheckpointMismatchError(f"a ring of {n_ring} keys does not fit window {window_size}")
    return window_size - side


def _axis_to_source(v: float, dst_ws: int, src_ws: int) -> float:
    """One ring-offset coordinate of a dst_ws window expressed in a src_ws window's frame."""
    if v < 0:  # before the window: keep the distance to its edge
        return v
    if v >= dst_ws:  # after the window: keep the distance to its far edge
        return v - dst_ws + src_ws
    return (v + 0.5) * src_ws / dst_ws - 0.5  # along the window: scale with it


def ring_source_index(src_ws: int, src_e: int, dst_ws: int, dst_e: int) -> torch.Tensor:
    """For each ring key of (dst_ws, dst_e), the index of the nearest ring key of (src_ws, src_e).

    Both rings are in the released key order (``ring_offsets``, duplicates included); ties go to the
    first source entry. The identity when the geometries are equal.
    """
    src = torch.tensor(ring_offsets(src_ws, src_e), dtype=torch.float64)  # (n_src, 2)
    if (src_ws, src_e) == (dst_ws, dst_e):
        return torch.arange(len(src))
    dst = torch.tensor(
        [[_axis_to_source(v, dst_ws, src_ws) for v in offset] for offset in ring_offsets(dst_ws, dst_e)],
        dtype=torch.float64,
    )  # (n_dst, 2)
    return torch.cdist(dst, src).argmin(1)


def resize_ring_bias_table(table: torch.Tensor, window_size: int, expand_size: int) -> torch.Tensor:
    """Ring table (1, nH, ws^2, n_ring) -> (1, nH, window_size^2, n_ring') of a (window_size, expand_size) ring."""
    _, num_heads, ws2, n_ring = table.shape
    src_ws = _square_side(ws2, "relative_position_bias_table_to_neighbors")
    src_e = expand_size_of_ring(src_ws, n_ring)
    table = table[..., ring_source_index(src_ws, src_e, window_size, expand_size)]  # (1, nH, ws^2, n_ring')
    grids = table.permute(0, 1, 3, 2).reshape(num_heads, -1, src_ws, src_ws)  # (nH, n_ring', ws, ws)
    grids = resize_grids(grids, window_size)
    return grids.reshape(1, num_heads, -1, window_size**2).permute(0, 1, 3, 2).contiguous()


def resize_pool_weight(weight: torch.Tensor, cell: int) -> torch.Tensor:
    """fc (1, c^2) or depthwise conv (C, 1, c, c) pooling weights -> cell x cell, per-channel sums preserved."""
    if weight.dim() == 2:
        old = _square_side(weight.shape[1], "pool_layers weight")
        grids = weight.reshape(weight.shape[0], old, old)
    else:
        old = weight.shape[-1]
        grids = weight.reshape(weight.shape[0], old, old)
    if old == cell:
        return weight
    resized = resize_grids(grids, cell) * (old / cell) ** 2  # (C, cell, cell)
    residual = grids.sum((1, 2)) - resized.sum((1, 2))  # (C,)
    resized = resized + residual[:, None, None] / cell**2
    return resized.reshape(weight.shape[0], cell * cell) if weight.dim() == 2 else resized[:, None]


def resize_abs_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, N, C) square-grid absolute position embedding -> (1, num_tokens, C) (the model's ``resize_pos_embed``)."""
    _square_side(pos_embed.shape[1], "absolute_pos_embed")
    side = _square_side(num_tokens, "target absolute_pos_embed")
    return resize_pos_embed(pos_embed, side, side).reshape(1, num_tokens, -1).contiguous()


# ---- state dict adaptation -------------------------------------------------------------------------------
@dataclass
class AdaptedCheckpoint:
    """The loadable state dict and what was done to get it (for logs and checks)."""

    state_dict: dict[str, torch.Tensor]
    resized: dict[str, str] = field(default_factory=dict)  # key -> "old shape -> new shape"
    reinitialised: list[str] = field(default_factory=list)  # model keys left at their fresh init
    dropped: list[str] = field(default_factory=list)  # checkpoint keys not loaded (besides derived buffers)
    derived: list[str] = field(default_factory=list)  # derived buffers dropped


def _resize_entry(key: str, value: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """``value`` resized to ``target``'s shape, or None when ``key`` is not a resizable kind."""
    if _WINDOW_TABLE.search(key):
        return resize_window_bias_table(value, target.shape[0])
    if _POOLED_TABLE.search(key):
        return resize_pooled_bias_table(value, target.shape[1])
    if _RING_TABLE.search(key):
        attn = model.get_submodule(key.rsplit(".", 1)[0])
        return resize_ring_bias_table(value, attn.window_size, attn.expand_size)
    if _POOL_WEIGHT.search(key):
        cell = _square_side(target.shape[1], key) if target.dim() == 2 else target.shape[-1]
        return resize_pool_weight(value, cell)
    if key == "absolute_pos_embed":
        return resize_abs_pos_embed(value, target.shape[1])
    return None


def _block_of(key: str) -> str:
    """The attention prefix of a ring-table key: 'layers.i.blocks.j.attn'."""
    return key.rsplit(".", 1)[0]


def adapt_checkpoint(checkpoint: Mapping[str, torch.Tensor], model: nn.Module) -> AdaptedCheckpoint:
    """Adapt ``checkpoint`` to ``model`` (see the module docstring); keys it cannot place are left out.

    Raises CheckpointMismatchError for a shape difference it does not know how to resize (including a
    different number of heads). Missing or unexpected keys of unknown kinds are not decided here; see
    ``load_pretrained``.
    """
    source = unwrap_state_dict(checkpoint)
    expected = model.state_dict()
    result = AdaptedCheckpoint(state_dict={})
    source_attn = {_block_of(k) for k in source if _WINDOW_TABLE.search(k)}
    problems = []
    for key, value in source.items():
        if RELEASED_BUFFER_NAME.search(key) and key not in expected:
            result.derived.append(key)
            continue
        if key not in expected:
            if _RING_TABLE.search(key) or _HEAD.search(key):  # the target has no ring / no head here
                result.dropped.append(key)
            else:
                result.state_dict[key] = value  # unexpected: reported by the loader
            continue
        target = expected[key]
        if value.shape == target.shape:
            result.state_dict[key] = value
            continue
        if _HEAD.search(key):
            result.dropped.append(key)
            result.reinitialised.append(key)
            continue
        try:
            resized = _resize_entry(key, value, target, model)
        except CheckpointMismatchError as error:
            problems.append(f"{key}: {error}")
            continue
        if resized is None or resized.shape != target.shape:
            problems.append(f"{key} {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        result.state_dict[key] = resized
        result.resized[key] = f"{tuple(value.shape)} -> {tuple(target.shape)}"
    if problems:
        raise CheckpointMismatchError("cannot adapt: " + "; ".join(problems))
    for key in expected:
        if key in result.state_dict or key in result.reinitialised:
            continue
        new_ring = _RING_TABLE.search(key) and _block_of(key) in source_attn
        new_head = _HEAD.search(key) and not any(_HEAD.search(k) for k in source)
        if new_ring or new_head:
            result.reinitialised.append(key)
    result.reinitialised.sort()
    return result


def _log_adaptation(adapted: AdaptedCheckpoint, logger: logging.Logger) -> None:
    if adapted.derived:
        logger.info("dropped %d derived buffers (the model rebuilds them)", len(adapted.derived))
    for key, change in adapted.resized.items():
        logger.info("resized %s %s", key, change)
    for key in adapted.dropped:
        logger.info("not loaded: %s (no use for it in this model)", key)
    for key in adapted.reinitialised:
        logger.info("re-initialised: %s", key)


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, logger: logging.Logger | None = None
) -> dict[str, torch.Tensor]:
    """``state_dict`` made loadable into ``model`` (other img_size / window_size / num_classes); logs changes."""
    adapted = adapt_checkpoint(state_dict, model)
    _log_adaptation(adapted, logger or _logger)
    return adapted.state_dict


def load_pretrained(
    model: nn.Module, checkpoint_state_dict: Mapping[str, torch.Tensor], logger: logging.Logger | None = None
) -> list[str]:
    """Adapt and load a checkpoint into ``model``; return the keys that keep their fresh initialisation.

    Raises CheckpointMismatchError when a model key other than those is missing from the checkpoint, or
    when the checkpoint holds keys the model does not know.
    """
    logger = logger or _logger
    adapted = adapt_checkpoint(checkpoint_state_dict, model)
    _log_adaptation(adapted, logger)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(adapted.state_dict) - set(adapted.reinitialised))
    unexpected = sorted(set(adapted.state_dict) - set(expected))
    problems = key_problems(missing, unexpected, limit=None)
    if problems:
        raise CheckpointMismatchError("checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(adapted.state_dict, strict=False)
    logger.info(
        "loaded %d tensors (%d resized); re-initialised: %s",
        len(adapted.state_dict),
        len(adapted.resized),
        ", ".join(adapted.reinitialised) or "none",
    )
    return adapted.reinitialised


__all__ = [
    "AdaptedCheckpoint",
    "adapt_checkpoint",
    "adapt_state_dict",
    "expand_size_of_ring",
    "load_pretrained",
    "resize_abs_pos_embed",
    "resize_grids",
    "resize_pool_weight",
    "resize_pooled_bias_table",
    "resize_ring_bias_table",
    "resize_window_bias_table",
    "ring_source_index",
]
