"""Focal window attention (v1), exact to the released implementation, computed as one gathered attention.

The released code builds the keys of a window from 4 rolled copies of k/v, a boolean index and an
``nn.Unfold`` per pooled level, then adds three kinds of position bias piece by piece. Here the same keys
are gathered once through a precomputed index (``focal_geometry.key_layout``), the same biases are read
from the concatenated tables through one precomputed index, and a single
``scaled_dot_product_attention`` call does the rest. Key order, duplicates, wrap-around and masks are
those of the release, so released weights give the same outputs (see tests/test_golden.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from .focal_geometry import (
    pooled_window_size,
    relative_position_index,
    released_valid_ind_rolled,
    released_valid_ind_unfold,
    window_partition,
    window_reverse,
)


def ring_size(window_size: int, expand_size: int) -> int:
    """Number of ring keys per window: 4 * ws^2 - 4 * (ws - e)^2 (duplicates included)."""
    return 4 * window_size**2 - 4 * (window_size - expand_size) ** 2


def focal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v.

    q: (B, G, Lq, hd); k, v: (B, G, Lk, hd); bias broadcastable to (B, G, Lq, Lk).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale)


class FocalWindowAttention(nn.Module):
    """Attention of each window's tokens to the window, its ring of fine neighbours and pooled regions.

    Parameter names and shapes are those of the released ``WindowAttention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        expand_size: int,
        focal_window: int,
        num_pooled_levels: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the stage dimension {dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.expand_size = expand_size
        self.focal_window = focal_window
        self.num_pooled_levels = num_pooled_levels
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.attn_drop = attn_drop

        ws2 = window_size * window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        if expand_size > 0:
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws2, ring_size(window_size, expand_size))
            )
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
        self.relative_position_bias_table_to_windows = nn.ParameterList()
        for k in range(num_pooled_levels):
            side = window_size + pooled_window_size(focal_window, k) - 1
            table = nn.Parameter(torch.zeros(num_heads, side * side))
            trunc_normal_(table, std=0.02)
            self.relative_position_bias_table_to_windows.append(table)
        self.register_buffer("bias_index", self._build_bias_index(), persistent=False)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _build_bias_index(self) -> torch.Tensor:
        """(ws^2, N) index of every (query, key slot) bias into the concatenation of all bias tables.

        Tables are concatenated heads-first: in-window table (transposed), the dense ring table, then the
        pooled tables, so ``position_bias`` needs one gather.
        """
        ws, ws2 = self.window_size, self.window_size**2
        parts = [relative_position_index(ws, ws)]
        offset = (2 * ws - 1) ** 2
        if self.expand_size > 0:
            n_ring = ring_size(ws, self.expand_size)
            parts.append(offset + torch.arange(ws2 * n_ring).view(ws2, n_ring))
            offset += ws2 * n_ring
        for k in range(self.num_pooled_levels):
            size = pooled_window_size(self.focal_window, k)
            parts.append(offset + relative_position_index(ws, size))
            offset += (ws + size - 1) ** 2
        return torch.cat(parts, 1)

    def position_bias(self) -> torch.Tensor:
        """Learned bias of every query to every key slot: (nH, ws^2, N)."""
        tables = [self.relative_position_bias_table.t()]
        if self.expand_size > 0:
            tables.append(self.relative_position_bias_table_to_neighbors.flatten(2)[0])
        tables.extend(self.relative_position_bias_table_to_windows)
        return torch.cat(tables, 1)[:, self.bias_index]

    def released_buffers(self) -> dict[str, torch.Tensor]:
        """The derived index buffers the released module stores in its state_dict, by name."""
        buffers = {"relative_position_index": relative_position_index(self.window_size, self.window_size)}
        if self.expand_size > 0:
            buffers["valid_ind_rolled"] = released_valid_ind_rolled(self.window_size, self.expand_size)
        for k in range(self.num_pooled_levels):
            size = pooled_window_size(self.focal_window, k)
            buffers[f"relative_position_index_{k}"] = relative_position_index(self.window_size, size)
            if k > 0:
                buffers[f"valid_ind_unfold_{k}"] = released_valid_ind_unfold(self.focal_window, k)
        return buffers

    def forward(
        self, x: torch.Tensor, pooled: list[torch.Tensor], key_index: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """x: padded (shifted) map (B, Hp, Wp, C); pooled: maps (B, gh_k, gw_k, C); returns (B, Hp, Wp, C).

        key_index (nW, N) and key_mask (nW, ws^2, N) come from ``focal_geometry.key_layout``.
        """
        B, Hp, Wp, C = x.shape
        ws, nH = self.window_size, self.num_heads
        n_windows, n_keys = key_index.shape
        qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
        q = window_partition(qkv[..., :C], ws)  # (B, nW, ws*ws, C)
        q = q.view(B, n_windows, ws * ws, nH, C // nH).transpose(2, 3).reshape(B, n_windows * nH, ws * ws, -1)

        # Key source: full-resolution k/v, then k/v of each pooled map, then a zero slot.
        kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        sources = [qkv[..., C:].reshape(B, Hp * Wp, 2 * C)]
        sources += [F.linear(p, kv_weight, kv_bias).reshape(B, -1, 2 * C) for p in pooled]
        sources.append(qkv.new_zeros(B, 1, 2 * C))
        kv = torch.cat(sources, 1)[:, key_index.view(-1)]  # (B, nW*N, 2C)
        kv = kv.view(B, n_windows, n_keys, 2, nH, C // nH).permute(3, 0, 1, 4, 2, 5)  # (2, B, nW, nH, N, hd)
        k, v = kv.reshape(2, B, n_windows * nH, n_keys, C // nH).unbind(0)

        bias = self.position_bias()[None] + key_mask[:, None]  # (nW, nH, ws*ws, N)
        bias = bias.reshape(1, n_windows * nH, ws * ws, n_keys)
        dropout_p = self.attn_drop if self.training else 0.0
        out = focal_attention(q, k, v, bias, self.scale, dropout_p)  # (B, nW*nH, ws*ws, hd)
        out = out.view(B, n_windows, nH, ws * ws, C // nH).transpose(2, 3).reshape(B, n_windows, ws * ws, C)
        out = self.proj_drop(self.proj(out))
        return window_reverse(out, ws, Hp, Wp)
