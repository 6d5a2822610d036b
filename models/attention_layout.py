"""Views between a (B, Hp, Wp, C) map and the window / head layout focal attention reads, and the bias format.

Shared by the reference attention (``focal_attention.reference_focal_attention``) and the chunked CPU path
(``cpu_focal_attention``); the fused kernels (``fused_focal_attention``) read the map directly.
"""

from __future__ import annotations

import torch


def window_view(x: torch.Tensor, window_size: int, num_heads: int) -> torch.Tensor:
    """(..., Hp, Wp, C) map (any strides) -> (..., nWh, nWw, nH, ws, ws, hd) view of its windows and heads, no copy."""
    *lead, Hp, Wp, C = x.shape
    ws, d = window_size, len(lead)
    x = x.view(*lead, Hp // ws, ws, Wp // ws, ws, num_heads, C // num_heads)
    return x.permute(*range(d), d, d + 2, d + 4, d + 1, d + 3, d + 5)


def map_to_window_heads(x: torch.Tensor, window_size: int, num_heads: int) -> torch.Tensor:
    """(B, Hp, Wp, C) map -> (B, nW, nH, ws*ws, hd): windows row-major, then heads, then tokens row-major."""
    B, _, _, C = x.shape
    return window_view(x, window_size, num_heads).reshape(B, -1, num_heads, window_size**2, C // num_heads)


def window_heads_to_map(windows: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """(B, nW, nH, ws*ws, hd) windows (any strides) -> (B, Hp, Wp, C) map."""
    B, _, nH, n, hd = windows.shape
    out = windows.new_empty(B, *map_size, nH * hd)
    target = window_view(out, round(n**0.5), nH)
    target.copy_(windows.reshape(target.shape))
    return out


def key_value_rows(key_index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Where each window's keys and values are, head by head: (2, nW, nH, N) rows of a key source viewed
    as (L * 2 * nH, hd) rows (key source token l holds k heads 0..nH-1, then v heads, in rows 2*nH*l...)."""
    part = torch.arange(2 * num_heads, device=key_index.device).view(2, 1, num_heads, 1)  # k/v, head
    return key_index[None, :, None, :] * (2 * num_heads) + part


def gather_keys_values(kv_source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, L, 2C) key source, (2, nW, nH, N) ``key_value_rows`` -> (B, 2, nW, nH, N, hd), one gather of
    head-sized rows straight into the layout attention reads (faster than gathering tokens and permuting)."""
    B, L, C2 = kv_source.shape
    hd = C2 // (2 * rows.shape[2])
    n_rows = L * C2 // hd
    index = rows.reshape(1, -1) + n_rows * torch.arange(B, device=rows.device)[:, None]  # (B, 2*nW*nH*N)
    kv = kv_source.reshape(B * n_rows, hd).index_select(0, index.reshape(-1))
    return kv.view(B, *rows.shape, hd)


def full_bias(bias: torch.Tensor, mask: torch.Tensor | None, n_windows: int) -> torch.Tensor:
    """The attention bias as one (nW, nH, n, N) tensor: ``bias`` (1 or nW, nH, n, N) plus ``mask`` (nW, 1, n, N)."""
    total = bias if mask is None else bias + mask
    return total.expand(n_windows, *total.shape[1:])
