"""The attention every path must reproduce, written plainly: gather each window's keys, one fused call."""

from __future__ import annotations

import torch

from models.focal_attention import (
    focal_attention,
    gather_keys_values,
    key_value_rows,
    map_to_window_heads,
    window_heads_to_map,
)


def gathered_attention(
    qkv: torch.Tensor,
    pooled_kv: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    window_size: int,
    num_heads: int,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v over gathered keys, with plain autograd: qkv (B, Hp, Wp, 3C), pooled_kv
    (B, L_pooled, 2C), key_index (nW, N), bias (nW, nH, ws*ws, N) -> (B, Hp, Wp, C)."""
    C = qkv.shape[-1] // 3
    q = map_to_window_heads(qkv[..., :C], window_size, num_heads)  # (B, nW, nH, n, hd)
    kv_source = torch.cat([qkv[..., C:].flatten(1, 2), pooled_kv], 1)
    n_windows = q.shape[1]
    k, v = gather_keys_values(kv_source, key_value_rows(key_index, num_heads)).flatten(2, 3).unbind(1)
    out = focal_attention(q.flatten(1, 2), k, v, bias.flatten(0, 1)[None], scale, 0.0)
    return window_heads_to_map(out.unflatten(1, (n_windows, num_heads)), tuple(qkv.shape[1:3]))
