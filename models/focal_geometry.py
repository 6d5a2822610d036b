"""Pure index and mask builders for focal self-attention (v1).

Every function here is a deterministic function of integers; the attention module turns their output
into (non-persistent) buffers. The names of the released buffers (``relative_position_index``,
``valid_ind_rolled``, ``relative_position_index_k``, ``valid_ind_unfold_k``, ``attn_mask``) are
reproduced by ``released_*`` helpers so released checkpoints can be checked against them.

Flat key indices address one "key source" per block: the padded (and shifted) full-resolution map
flattened row-major, followed by each pooled map flattened row-major, followed by one all-zero slot
that stands for the unfold's zero padding of the pooled maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MASK_VALUE = -100.0  # the released additive mask value (not -inf)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nWh * nWw, window_size**2, C), windows row-major, tokens row-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, -1, window_size * window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """(B, nWh * nWw, window_size**2, C) -> (B, H, W, C); inverse of ``window_partition``."""
    B, _, _, C = windows.shape
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def relative_position_index(q_size: int, k_size: int) -> torch.Tensor:
    """Index of the bias of query (qi, qj) in a q_size window and key (ki, kj) in a k_size grid.

    idx = (qi - ki + k_size - 1) * (q_size + k_size - 1) + (qj - kj + k_size - 1); shape (q_size**2, k_size**2).
    With q_size == k_size this is Swin's in-window index.
    """
    q = torch.stack(torch.meshgrid(torch.arange(q_size), torch.arange(q_size), indexing="ij")).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(k_size), torch.arange(k_size), indexing="ij")).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + (k_size - 1)  # (2, q*q, k*k)
    return rel[0] * (q_size + k_size - 1) + rel[1]


def released_valid_ind_rolled(window_size: int, expand_size: int) -> torch.Tensor:
    """The released ``valid_ind_rolled``: kept entries of the 4 rolled windows (tl, tr, bl, br), row-major."""
    ws, e = window_size, expand_size
    masks = torch.ones(4, ws, ws)
    # Python slicing semantics of the release: with e == ws the slices are empty and nothing is removed.
    masks[0, :-e, :-e] = 0
    masks[1, :-e, e:] = 0
    masks[2, e:, :-e] = 0
    masks[3, e:, e:] = 0
    return masks.flatten().nonzero().view(-1)


# Content offset of each rolled group: roll(-e, -e) shows the token at (r + e, c + e), and so on.
_ROLL_GROUP_SIGNS = ((1, 1), (1, -1), (-1, 1), (-1, -1))


def ring_offsets(window_size: int, expand_size: int) -> list[tuple[int, int]]:
    """(row, col) offsets from a window's top-left token of the ring keys, in the released key order.

    Includes the released duplicates (ws > 2e) and gaps (ws < 2e) exactly.
    """
    ws, e = window_size, expand_size
    offsets = []
    for flat in released_valid_ind_rolled(ws, e).tolist():
        group, pos = divmod(flat, ws * ws)
        r, c = divmod(pos, ws)
        sr, sc = _ROLL_GROUP_SIGNS[group]
        offsets.append((r + sr * e, c + sc * e))
    return offsets


def merged_key_columns(window_size: int, expand_size: int, num_pooled_keys: int) -> torch.Tensor:
    """Released key columns grouped by the token they read: (N_merged, m <= 2) column indices, -1 padded.

    The released ring repeats some tokens (``ring_offsets``: 12 of 132 at ws 7, e 3). A repeated key has the
    same k and v in every window, so the columns that read it can be merged into one key whose bias is the
    log-sum-exp of their biases: exp(s + b1) + exp(s + b2) = exp(s + log(exp(b1) + exp(b2))), the softmax
    and the output are unchanged. Row i lists the released columns of merged key i: the window columns,
    the distinct ring offsets in first-occurrence order, then the ``num_pooled_keys`` pooled columns.
    A ring token is in at most two of the four rolled groups: it lies above (not in groups 0, 1), below
    (not 2, 3), left of (not 0, 2) or right of (not 1, 3) the window, so m <= 2.
    """
    ws2 = window_size * window_size
    groups: dict[tuple[int, int], list[int]] = {}
    if expand_size > 0:
        for column, offset in enumerate(ring_offsets(window_size, expand_size), start=ws2):
            groups.setdefault(offset, []).append(column)
    n_ring = sum(len(columns) for columns in groups.values())
    rows = [[c] for c in range(ws2)] + list(groups.values())
    rows += [[c] for c in range(ws2 + n_ring, ws2 + n_ring + num_pooled_keys)]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)


def released_valid_ind_unfold(focal_window: int, level: int) -> torch.Tensor:
    """The released ``valid_ind_unfold_k``: bottom-right (fw + 2^k - 1)^2 part of the unfold kernel."""
    kernel = unfold_kernel_size(focal_window, level)
    mask = torch.zeros(kernel, kernel)
    mask[2**level - 1 :, 2**level - 1 :] = 1
    return mask.flatten().nonzero().view(-1)


def unfold_kernel_size(focal_window: int, level: int) -> int:
    """Kernel of the released ``nn.Unfold`` for pooled level ``level``."""
    return 2 * (focal_window // 2) + 2**level + (2**level - 1)


def pooled_window_size(focal_window: int, level: int) -> int:
    """Side of the pooled neighbourhood each window attends to at ``level``: fw + 2^k - 1."""
    return focal_window + 2**level - 1


@dataclass(frozen=True)
class PooledLevel:
    """Geometry of one pooled level of a padded (Hp, Wp) map."""

    cell: int  # side of the pooled cells (floor(ws / 2^k))
    grid_h: int  # pooled map rows: (Hp / ws) * 2^k
    grid_w: int
    trim_top: int  # centre trim before pooling (bottom/right get the extra row)
    trim_left: int


def pooled_level(padded_h: int, padded_w: int, window_size: int, level: int) -> PooledLevel:
    """Cell size, grid and centre trim of pooled level ``level`` (never pads: cell * 2^k <= ws)."""
    cell = math.floor(window_size / 2**level)
    grid_h = math.ceil(padded_h / window_size) * 2**level
    grid_w = math.ceil(padded_w / window_size) * 2**level
    return PooledLevel(
        cell=cell,
        grid_h=grid_h,
        grid_w=grid_w,
        trim_top=(padded_h - grid_h * cell) // 2,
        trim_left=(padded_w - grid_w * cell) // 2,
    )


def window_key_index(padded_h: int, padded_w: int, window_size: int) -> torch.Tensor:
    """Flat indices of each window's own tokens: (nW, ws**2)."""
    rows = torch.arange(0, padded_h, window_size)
    cols = torch.arange(0, padded_w, window_size)
    r = torch.arange(window_size)
    top = rows[:, None, None, None] + r[None, None, :, None]  # (nWh, 1, ws, 1)
    left = cols[None, :, None, None] + r[None, None, None, :]  # (1, nWw, 1, ws)
    return (top * padded_w + left).reshape(len(rows) * len(cols), window_size * window_size)


def ring_key_index(padded_h: int, padded_w: int, window_size: int, expand_size: int) -> torch.Tensor:
    """Flat indices of each window's ring keys, wrapping around the map like ``torch.roll``: (nW, n_ring)."""
    offsets = torch.tensor(ring_offsets(window_size, expand_size), dtype=torch.long)  # (n_ring, 2)
    rows = torch.arange(0, padded_h, window_size)
    cols = torch.arange(0, padded_w, window_size)
    r = (rows[:, None, None] + offsets[None, None, :, 0]) % padded_h  # (nWh, 1, n_ring)
    c = (cols[None, :, None] + offsets[None, None, :, 1]) % padded_w  # (1, nWw, n_ring)
    return (r * padded_w + c).reshape(len(rows) * len(cols), len(offsets))


def pooled_key_index(grid_h: int, grid_w: int, focal_window: int, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a (grid_h, grid_w) pooled map of each window's pooled neighbourhood.

    Window (i, j) attends to the K x K cells (K = fw + 2^k - 1) starting at (i * 2^k - fw // 2, ...),
    row-major, as the released unfold + ``valid_ind_unfold_k`` selection does. Returns
    (index (nW, K*K), valid (nW, K*K) bool); cells outside the map (the unfold's zero padding) are invalid.
    """
    stride = 2**level
    size = pooled_window_size(focal_window, level)
    n_h, n_w = grid_h // stride, grid_w // stride
    a = torch.arange(size) - focal_window // 2
    r = torch.arange(n_h)[:, None, None, None] * stride + a[None, None, :, None]  # (nWh, 1, K, 1)
    c = torch.arange(n_w)[None, :, None, None] * stride + a[None, None, None, :]  # (1, nWw, 1, K)
    valid = (r >= 0) & (r < grid_h) & (c >= 0) & (c < grid_w)  # (nWh, nWw, K, K)
    index = (r * grid_w + c).expand_as(valid)
    return index.reshape(n_h * n_w, size * size), valid.reshape(n_h * n_w, size * size)


def key_layout(
    padded_h: int,
    padded_w: int,
    window_size: int,
    expand_size: int,
    focal_window: int,
    num_pooled_levels: int,
    shift_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every key of every window comes from, and its additive mask.

    Keys per window, in the released order: the ws^2 window tokens, the ring (if expand_size > 0), then
    the pooled neighbourhood of each level. Returns ``key_index`` (nW, N) into the key source (see the
    module docstring) and ``key_mask`` (nW, ws^2, N): Swin's shift mask on the window keys, -100 on pooled
    keys from outside the pooled map, 0 elsewhere. Padded tokens and wrapped ring tokens stay unmasked.
    """
    ws2 = window_size * window_size
    index_parts = [window_key_index(padded_h, padded_w, window_size)]
    n_windows = index_parts[0].shape[0]
    if shift_size > 0:
        mask_parts = [shift_attn_mask(padded_h, padded_w, window_size, shift_size)]
    else:
        mask_parts = [torch.zeros(n_windows, ws2, ws2)]
    if expand_size > 0:
        index_parts.append(ring_key_index(padded_h, padded_w, window_size, expand_size))
        mask_parts.append(torch.zeros(n_windows, ws2, index_parts[-1].shape[1]))
    levels = [pooled_level(padded_h, padded_w, window_size, k) for k in range(num_pooled_levels)]
    zero_slot = padded_h * padded_w + sum(lvl.grid_h * lvl.grid_w for lvl in levels)
    offset = padded_h * padded_w
    for k, lvl in enumerate(levels):
        index, valid = pooled_key_index(lvl.grid_h, lvl.grid_w, focal_window, k)
        index_parts.append(torch.where(valid, index + offset, zero_slot))
        level_mask = torch.zeros(valid.shape).masked_fill(~valid, MASK_VALUE)  # (nW, K*K)
        mask_parts.append(level_mask[:, None, :].expand(n_windows, ws2, -1))
        offset += lvl.grid_h * lvl.grid_w
    return torch.cat(index_parts, 1), torch.cat(mask_parts, 2)


def shift_attn_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's mask for shifted windows on an (H, W) map (multiples of ws): (nW, ws**2, ws**2), 0 / -100."""
    img_mask = torch.zeros(1, height, width, 1)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for h in slices:
        for w in slices:
            img_mask[:, h, w, :] = region
            region += 1
    regions = window_partition(img_mask, window_size)[0, :, :, 0]  # (nW, ws*ws)
    diff = regions[:, None, :] - regions[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)
