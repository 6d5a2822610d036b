"""Focal window attention (v1), exact to the released implementation, computed as gathered attention.

The released code builds the keys of a window from 4 rolled copies of k/v, a boolean index and an
``nn.Unfold`` per pooled level, then adds three kinds of position bias piece by piece. Here the same keys
are read through a precomputed index (``focal_geometry.key_layout``), the same biases are read from the
concatenated tables through one precomputed index, and ``windowed_focal_attention`` does the rest: on CUDA two
Triton kernels that read the keys through the index (``fused_focal_attention.py``), on CPU batched matrix
products image by image, with attention dropout or in float64 one ``scaled_dot_product_attention`` call over
gathered keys. Key order, wrap-around and masks are those of the release, so released weights give the same
outputs (see tests/test_golden.py). Two rewrites leave the softmax unchanged up to rounding:

- ring keys the release repeats (same token, own bias column) are merged into one key whose bias is the
  log-sum-exp of theirs (``focal_geometry.merged_key_columns``);
- on CPU the attention runs one image at a time, so the gathered keys (3-5x the size of the map) stay
  in cache and small enough to be reused from the allocator instead of faulting in fresh pages; the
  scores start from the bias inside ``baddbmm`` and the softmax runs in place (faster there than the
  fused flash kernel at 49 queries per window), and training goes through ``PerImageFocalAttention``,
  which saves the ungathered key source instead of the gathered keys and recomputes the probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.autograd.function import once_differentiable

from . import fused_focal_attention
from .focal_geometry import (
    merged_key_columns,
    pooled_window_size,
    relative_position_index,
    released_valid_ind_rolled,
    released_valid_ind_unfold,
)

# Devices whose attention runs in the fused Triton kernels (tests add "cpu", where Triton's interpreter runs them).
FUSED_DEVICES = {"cuda"}


def ring_size(window_size: int, expand_size: int) -> int:
    """Number of ring keys per window: 4 * ws^2 - 4 * (ws - e)^2 (duplicates included)."""
    return 4 * window_size**2 - 4 * (window_size - expand_size) ** 2


def head_scale(dim: int, num_heads: int, qk_scale: float | None) -> float:
    """The q k^T scale, ``qk_scale`` or head_dim ** -0.5; refuses a head count that does not divide ``dim``."""
    if dim % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide the stage dimension {dim}")
    return qk_scale or (dim // num_heads) ** -0.5


def focal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v.

    q: (B, G, Lq, hd); k, v: (B, G, Lk, hd); bias broadcastable to (B, G, Lq, Lk).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout_p, scale=scale)


# ---- layout helpers -----------------------------------------------------------------------------------------


def map_to_window_heads(x: torch.Tensor, window_size: int, num_heads: int) -> torch.Tensor:
    """(B, Hp, Wp, C) map -> (B, nW, nH, ws*ws, hd): windows row-major, then heads, then tokens row-major."""
    B, Hp, Wp, C = x.shape
    ws = window_size
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, num_heads, C // num_heads)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, -1, num_heads, ws * ws, C // num_heads)


def window_heads_to_map(
    windows: torch.Tensor, map_size: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, nW, nH, ws*ws, hd) windows (any strides) -> (B, Hp, Wp, C) map, written into ``out`` if given."""
    B, _, nH, n, hd = windows.shape
    ws = round(n**0.5)
    Hp, Wp = map_size
    windows = windows.reshape(B, Hp // ws, Wp // ws, nH, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6)
    if out is None:
        return windows.reshape(B, Hp, Wp, nH * hd)
    out.view(windows.shape).copy_(windows)
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


def image_keys_values(kv_source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One image's gathered keys and values: kv_source (L, 2C), ``key_value_rows`` -> (2, nW*nH, N, hd)."""
    return gather_keys_values(kv_source[None], rows)[0].flatten(1, 2)


def image_probabilities(scaled_q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) of one image: scaled_q (G, n, hd), k (G, N, hd), bias (G, n, N) -> (G, n, N).

    The bias enters the product as its initial value and the softmax runs in place: one buffer, no extra pass
    (measured faster on CPU than the fused flash kernel at these window sizes).
    """
    scores = torch.baddbmm(bias, scaled_q, k.transpose(1, 2))
    return torch.softmax(scores, -1, out=scores)


def attend_image(
    scaled_q: torch.Tensor, kv_source: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, out: torch.Tensor
) -> None:
    """Attention of one image, written into its (Hp, Wp, C) map ``out``.

    scaled_q: (nW, nH, n, hd); kv_source: (L, 2C); rows (2, nW, nH, N) from ``key_value_rows``; bias (nW, nH, n, N).
    """
    n_windows, nH, n, hd = scaled_q.shape
    k, v = image_keys_values(kv_source, rows)  # (nW*nH, N, hd) each
    p = image_probabilities(scaled_q.reshape(-1, n, hd), k, bias.flatten(0, 1))
    attended = torch.bmm(p, v).view(1, n_windows, nH, n, hd)
    window_heads_to_map(attended, out.shape[:2], out[None])


def attend_images(
    scaled_q: torch.Tensor, kv_source: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, map_size: tuple[int, int]
) -> torch.Tensor:
    """``attend_image`` for each image of scaled_q (B, nW, nH, n, hd) and kv_source (B, L, 2C): (B, Hp, Wp, C)."""
    B, _, nH, _, hd = scaled_q.shape
    out = scaled_q.new_empty(B, *map_size, nH * hd)
    for i in range(B):
        attend_image(scaled_q[i], kv_source[i], rows, bias, out[i])
    return out


class PerImageFocalAttention(torch.autograd.Function):
    """Focal attention on CPU, one image at a time, with a memory-lean backward.

    Inputs: q (B, nW, nH, n, hd), kv_source (B, L, 2C), rows (2, nW, nH, N) from ``key_value_rows``, bias
    (nW, nH, n, N), the scale and the map size (Hp, Wp). Output: the (B, Hp, Wp, C) map of attended values.
    The forward attends each image's gathered keys and drops them at once; one image at a time keeps them
    in cache and lets the allocator reuse one buffer (measured faster than larger chunks or one call per
    batch). Nothing per key is saved: the backward gathers the keys again, recomputes the probabilities and
    returns the gradients of q, the key source (scattered back through the index) and the bias (summed
    over images).
    """

    @staticmethod
    def forward(ctx, q, kv_source, rows, bias, scale, map_size):
        scaled_q = q * scale
        out = attend_images(scaled_q, kv_source, rows, bias, map_size)
        ctx.scale = scale
        ctx.save_for_backward(scaled_q, kv_source, rows, bias, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        scaled_q, kv_source, rows, bias, out = ctx.saved_tensors
        need_q, need_kv, _, need_bias = ctx.needs_input_grad[:4]
        B, n_windows, nH, n, hd = scaled_q.shape
        n_keys = rows.shape[-1]
        G, ws = n_windows * nH, round(n**0.5)
        grad_q = torch.empty_like(scaled_q) if need_q else None
        grad_kv = torch.zeros_like(kv_source) if need_kv else None
        grad_bias = torch.zeros(G, n, n_keys, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)
        grad_kv_image = scaled_q.new_empty(2, G, n_keys, hd)
        bias = bias.reshape(G, n, n_keys)
        flat_rows = rows.reshape(-1)
        # Cheap per-query terms for the whole batch at once: dO and rowsum(dO * O) in window layout.
        qs = scaled_q.view(B, G, n, hd)
        do = map_to_window_heads(grad_out, ws, nH).view(B, G, n, hd)
        delta = (grad_out * out).unflatten(-1, (nH, hd)).sum(-1)  # (B, Hp, Wp, nH)
        delta = map_to_window_heads(delta, ws, nH).view(B, G, n, 1)
        for i in range(B):
            k, v = image_keys_values(kv_source[i], rows)  # (G, N, hd) each
            p = image_probabilities(qs[i], k, bias)  # (G, n, N)
            ds = torch.baddbmm(delta[i], do[i], v.transpose(1, 2), beta=-1).mul_(p)  # gradient of the scores
            grad_bias.add_(ds)
            if grad_q is not None:
                grad_q[i] = torch.bmm(ds, k).view(n_windows, nH, n, hd)
            if grad_kv is not None:
                torch.bmm(ds.transpose(1, 2), qs[i], out=grad_kv_image[0])
                torch.bmm(p.transpose(1, 2), do[i], out=grad_kv_image[1])
                grad_kv[i].view(-1, hd).index_add_(0, flat_rows, grad_kv_image.view(-1, hd))
        if grad_q is not None:
            grad_q.mul_(ctx.scale)
        grad_bias = grad_bias.view(n_windows, nH, n, n_keys).to(bias.dtype) if need_bias else None
        return grad_q, grad_kv, None, grad_bias, None, None


def attend_per_image(
    q: torch.Tensor,
    kv_source: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    map_size: tuple[int, int],
) -> torch.Tensor:
    """``windowed_focal_attention`` one image at a time, without dropout (the CPU path)."""
    rows = key_value_rows(key_index, q.shape[2])
    if torch.is_grad_enabled() and (q.requires_grad or kv_source.requires_grad or bias.requires_grad):
        return PerImageFocalAttention.apply(q, kv_source, rows, bias, scale, map_size)
    return attend_images(q * scale, kv_source, rows, bias, map_size)


def windowed_focal_attention(
    project: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout_p: float,
    window_size: int,
    num_heads: int,
) -> torch.Tensor:
    """Attention of every window's queries to its keys, returned as a (B, Hp, Wp, C) map.

    ``project()`` gives qkv: (B, Hp, Wp, 3C), q, k, v of the map (heads-major within each), and pooled_kv:
    (B, L_pooled, 2C), k then v of the pooled maps (and v1's zero slot); it is called here so that the paths which
    copy queries and keys out of qkv free it before attending. key_index: (nW, N) into the key source [map tokens
    row-major, pooled rows]; bias: (nW, nH, ws*ws, N), shared by the images. Three paths compute the same thing:
    on CUDA the fused Triton kernels (``fused_focal_attention``, which read the keys through the index); on CPU
    without dropout one image at a time (``attend_per_image``); otherwise (attention dropout, or float64) one
    ``scaled_dot_product_attention`` call over gathered keys.
    """
    qkv, pooled_kv = project()
    pooled_kv = pooled_kv.to(qkv.dtype)
    if qkv.device.type in FUSED_DEVICES and fused_focal_attention.supports(qkv, dropout_p):
        return fused_focal_attention.fused_focal_attention(
            qkv, pooled_kv, key_index, bias, scale, window_size, num_heads
        )
    C = qkv.shape[-1] // 3
    q = map_to_window_heads(qkv[..., :C], window_size, num_heads)  # (B, nW, nH, ws*ws, hd)
    kv_source = torch.cat([qkv[..., C:].flatten(1, 2), pooled_kv], 1)  # (B, L, 2C)
    map_size = tuple(qkv.shape[1:3])
    del qkv, pooled_kv  # copied out: free the projection before the attention's own buffers
    bias = bias.to(q.dtype)
    if q.device.type == "cpu" and dropout_p == 0.0:
        return attend_per_image(q, kv_source, key_index, bias, scale, map_size)
    B, n_windows, nH, n, hd = q.shape
    kv = gather_keys_values(kv_source, key_value_rows(key_index, nH))  # (B, 2, nW, nH, N, hd)
    k, v = kv.flatten(2, 3).unbind(1)  # (B, nW*nH, N, hd) each
    bias = bias.flatten(0, 1)[None]  # (1, nW*nH, n, N)
    out = focal_attention(q.flatten(1, 2), k, v, bias, scale, dropout_p)  # (B, nW*nH, n, hd)
    return window_heads_to_map(out.unflatten(1, (n_windows, nH)), map_size)


class KeyIndexedAttention(nn.Module):
    """What v1's ``FocalWindowAttention`` and v2's ``TopKFocalAttention`` share: the qkv projection of the map and
    of the pooled maps, the attention of every window to the keys its index names (``windowed_focal_attention``)
    and the output projection.

    Subclasses own the parameters (``qkv``, ``proj``, ``proj_drop``) and attributes (``dim``, ``scale``,
    ``attn_drop``, ``window_size``, ``num_heads``) under their released names; ``zero_slots`` zero keys end the
    key source (v1 points its padded keys there).
    """

    zero_slots = 0

    def attend_and_project(
        self, x: torch.Tensor, pooled: list[torch.Tensor], key_index: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """x: map (B, Hp, Wp, C); pooled: maps (B, h_l, w_l, C); key_index (nW, N) into [map tokens, pooled tokens,
        zero slots]; bias (nW, nH, ws*ws, N). Returns (B, Hp, Wp, C)."""

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
            C = self.dim
            kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
            pooled_kv = [F.linear(p, kv_weight, kv_bias).flatten(1, 2) for p in pooled]  # (B, h_l*w_l, 2C) each
            zeros = qkv.new_zeros(x.shape[0], self.zero_slots, 2 * C)
            return qkv, torch.cat([*pooled_kv, zeros], 1)

        dropout_p = self.attn_drop if self.training else 0.0
        out = windowed_focal_attention(
            project, key_index, bias, self.scale, dropout_p, self.window_size, self.num_heads
        )
        return self.proj_drop(self.proj(out))


class FocalWindowAttention(KeyIndexedAttention):
    """Attention of each window's tokens to the window, its ring of fine neighbours and pooled regions.

    Parameter names and shapes are those of the released ``WindowAttention``.
    """

    zero_slots = 1  # the key of padded positions

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
        self.scale = head_scale(dim, num_heads, qk_scale)
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.expand_size = expand_size
        self.focal_window = focal_window
        self.num_pooled_levels = num_pooled_levels
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
        bias_index = self._build_bias_index()
        self.register_buffer("bias_index", bias_index, persistent=False)
        n_pooled_keys = sum(pooled_window_size(focal_window, k) ** 2 for k in range(num_pooled_levels))
        columns = merged_key_columns(window_size, expand_size, n_pooled_keys)  # (N', m <= 2)
        self.register_buffer("merged_columns", columns[:, 0].contiguous(), persistent=False)
        self.register_buffer("merged_bias_index", bias_index[:, columns[:, 0]], persistent=False)  # (ws^2, N')
        # Merged keys that read two released columns (a ring token is in at most two rolled groups).
        repeated = (columns[:, -1] >= 0).nonzero()[:, 0] if columns.shape[1] == 2 else columns.new_zeros(0)
        self.register_buffer("repeated_keys", repeated, persistent=False)
        self.register_buffer("repeated_bias_index", bias_index[:, columns[repeated, -1]], persistent=False)

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

    def _bias_tables(self) -> torch.Tensor:
        """All bias tables concatenated heads-first: (nH, total entries)."""
        ring = [self.relative_position_bias_table_to_neighbors.flatten(2)[0]] if self.expand_size > 0 else []
        pooled = [self.relative_position_bias_table_to_windows[k] for k in range(self.num_pooled_levels)]
        return torch.cat([self.relative_position_bias_table.t(), *ring, *pooled], 1)

    def position_bias(self) -> torch.Tensor:
        """Learned bias of every query to every released key slot: (nH, ws^2, N)."""
        return self._bias_tables()[:, self.bias_index]

    def merged_position_bias(self) -> torch.Tensor:
        """Bias of every query to every merged key (repeated ring keys log-sum-exp'ed): (nH, ws^2, N')."""
        tables = self._bias_tables()
        bias = tables[:, self.merged_bias_index]
        if self.repeated_keys.numel():
            repeated = tables[:, self.repeated_bias_index]  # (nH, ws^2, n_repeated)
            merged = torch.logaddexp(bias.index_select(2, self.repeated_keys), repeated)
            bias = bias.index_copy(2, self.repeated_keys, merged)
        return bias

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

        key_index (nW, N) and key_mask (nW, ws^2, N) come from ``focal_geometry.key_layout`` (released key order).
        """
        columns = self.merged_columns
        key_index, key_mask = key_index[:, columns], key_mask[:, :, columns]  # repeated ring keys merged
        bias = self.merged_position_bias()[None] + key_mask[:, None]  # (nW, nH, ws*ws, N')
        return self.attend_and_project(x, pooled, key_index, bias)
