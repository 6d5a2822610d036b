"""Focal window attention (v1), exact to the released implementation, computed as gathered attention.

The released code builds the keys of a window from 4 rolled copies of k/v, a boolean index and an
``nn.Unfold`` per pooled level, then adds three kinds of position bias piece by piece. Here the same keys
are gathered through a precomputed index (``focal_geometry.key_layout``), the same biases are read from the
concatenated tables through one precomputed index, and a fused attention kernel does the rest. Key order,
wrap-around and masks are those of the release, so released weights give the same outputs (see
tests/test_golden.py). Two rewrites leave the softmax unchanged up to rounding:

- ring keys the release repeats (same token, own bias column) are merged into one key whose bias is the
  log-sum-exp of theirs (``focal_geometry.merged_key_columns``);
- on CPU the attention runs one image at a time, so the gathered keys (3-5x the size of the map) stay
  small enough to be reused from the allocator's cache, and training goes through
  ``PerImageFocalAttention``, which saves the ungathered key source instead of the gathered keys and
  computes the bias gradient the fused CPU kernel does not provide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.autograd.function import once_differentiable

from .focal_geometry import (
    merged_key_columns,
    pooled_window_size,
    relative_position_index,
    released_valid_ind_rolled,
    released_valid_ind_unfold,
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


# ---- layout helpers -----------------------------------------------------------------------------------------

# On CPU, images are attended in chunks whose gathered keys and attention scores stay under this size, so
# the allocator reuses the buffers of the previous chunk instead of mapping (and faulting in) fresh pages.
CPU_CHUNK_BYTES = 16 * 2**20


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


def gather_keys_values(kv_source: torch.Tensor, key_index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Keys and values of every window: (B, L, 2C) source, (nW, N) index -> (2, B, nW*nH, N, hd) contiguous."""
    B, L, C2 = kv_source.shape
    n_windows, n_keys = key_index.shape
    index = (key_index.reshape(1, -1) + L * torch.arange(B, device=key_index.device)[:, None]).reshape(-1)
    kv = kv_source.reshape(B * L, C2).index_select(0, index)  # (B*nW*N, 2C): one row-wise gather
    kv = kv.view(B, n_windows, n_keys, 2, num_heads, C2 // (2 * num_heads)).permute(3, 0, 1, 4, 2, 5)
    return kv.reshape(2, B, n_windows * num_heads, n_keys, -1)


def scatter_keys_values(grad_source: torch.Tensor, key_index: torch.Tensor, grad_kv: torch.Tensor) -> None:
    """Add (2, B, nW*nH, N, hd) key/value gradients into the (B, L, 2C) source gradient: ``gather``'s adjoint."""
    B, L, C2 = grad_source.shape
    n_windows, n_keys = key_index.shape
    _, _, G, _, hd = grad_kv.shape
    index = (key_index.reshape(1, -1) + L * torch.arange(B, device=key_index.device)[:, None]).reshape(-1)
    grad_kv = grad_kv.view(2, B, n_windows, G // n_windows, n_keys, hd).permute(1, 2, 4, 0, 3, 5)
    grad_source.view(B * L, C2).index_add_(0, index, grad_kv.reshape(-1, C2))


def image_chunks(batch: int, bytes_per_image: int, budget: int) -> list[tuple[int, int]]:
    """(start, stop) of equal-ish chunks of a batch, each at most ``budget`` bytes (at least one image)."""
    n_chunks = -(-batch // max(1, min(batch, budget // max(1, bytes_per_image))))
    size = -(-batch // n_chunks)
    return [(start, min(batch, start + size)) for start in range(0, batch, size)]


def _flash_cpu(q, k, v, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


class ChunkedFocalAttention(torch.autograd.Function):
    """Focal attention on CPU, a chunk of images at a time, with a memory-lean backward.

    Inputs: q (B, nW, nH, n, hd), kv_source (B, L, 2C), key_index (nW, N) into the source, bias
    (nW, nH, n, N), the scale, the map size (Hp, Wp) and the chunks of the batch. Output: the
    (B, Hp, Wp, C) map of attended values. The forward runs the fused CPU kernel per chunk and drops the
    chunk's gathered keys at once; the backward gathers them again, recomputes the probabilities from the
    saved log-sum-exp and returns the gradients of q, the key source (scattered back through the index) and
    the bias (summed over images), which the fused kernel's own backward does not give.
    """

    @staticmethod
    def forward(ctx, q, kv_source, key_index, bias, scale, map_size, chunks):
        B, n_windows, nH, n, hd = q.shape
        G = n_windows * nH
        out = q.new_empty(B, *map_size, nH * hd)
        lse = q.new_empty(B, G, n)
        for start, stop in chunks:
            k, v = gather_keys_values(kv_source[start:stop], key_index, nH)  # (b, G, N, hd) each
            o, lse[start:stop] = _flash_cpu(q[start:stop].flatten(1, 2), k, v, bias.flatten(0, 1)[None], scale)
            window_heads_to_map(o.unflatten(1, (n_windows, nH)), map_size, out[start:stop])
        ctx.scale, ctx.chunks = scale, chunks
        ctx.save_for_backward(q, kv_source, key_index, bias, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, kv_source, key_index, bias, out, lse = ctx.saved_tensors
        need_q, need_kv, _, need_bias = ctx.needs_input_grad[:4]
        scale = ctx.scale
        B, n_windows, nH, n, hd = q.shape
        n_keys = key_index.shape[1]
        G, ws = n_windows * nH, round(n**0.5)
        grad_q = torch.empty_like(q) if need_q else None
        grad_kv = torch.zeros_like(kv_source) if need_kv else None
        grad_bias = torch.zeros(G, n, n_keys, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)
        bias = bias.reshape(G, n, n_keys)
        for start, stop in ctx.chunks:
            b = stop - start
            k, v = (t.reshape(b * G, n_keys, hd) for t in gather_keys_values(kv_source[start:stop], key_index, nH))
            qs = q[start:stop].reshape(b * G, n, hd) * scale
            do = map_to_window_heads(grad_out[start:stop], ws, nH).reshape(b * G, n, hd)
            delta = (grad_out[start:stop] * out[start:stop]).unflatten(-1, (nH, hd)).sum(-1)  # (b, Hp, Wp, nH)
            delta = delta.unflatten(1, (-1, ws)).unflatten(3, (-1, ws)).permute(0, 1, 3, 5, 2, 4).reshape(b * G, n, 1)
            p = torch.bmm(qs, k.transpose(1, 2))  # (b*G, n, N) scores, then probabilities
            p.view(b, G, n, n_keys).add_(bias).sub_(lse[start:stop].unsqueeze(-1)).exp_()
            ds = torch.bmm(do, v.transpose(1, 2)).sub_(delta).mul_(p)  # gradient of the scores
            grad_bias.add_(ds.view(b, G, n, n_keys).sum(0))
            if grad_q is not None:
                grad_q[start:stop] = torch.bmm(ds, k).mul_(scale).view(b, n_windows, nH, n, hd)
            if grad_kv is not None:
                dkv = torch.stack([torch.bmm(ds.transpose(1, 2), qs), torch.bmm(p.transpose(1, 2), do)])
                scatter_keys_values(grad_kv[start:stop], key_index, dkv.view(2, b, G, n_keys, hd))
        grad_bias = grad_bias.view(n_windows, nH, n, n_keys).to(bias.dtype) if need_bias else None
        return grad_q, grad_kv, None, grad_bias, None, None, None


def attend_in_chunks(
    q: torch.Tensor,
    kv_source: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    map_size: tuple[int, int],
    chunk_bytes: int = CPU_CHUNK_BYTES,
) -> torch.Tensor:
    """``windowed_focal_attention`` a chunk of images at a time, without dropout (the CPU path)."""
    B, n_windows, nH, n, hd = q.shape
    n_keys = key_index.shape[1]
    per_image = n_windows * nH * n_keys * max(2 * hd, n) * q.element_size()  # gathered k/v or scores
    chunks = image_chunks(B, per_image, chunk_bytes)
    if torch.is_grad_enabled() and (q.requires_grad or kv_source.requires_grad or bias.requires_grad):
        return ChunkedFocalAttention.apply(q, kv_source, key_index, bias, scale, map_size, chunks)
    out = q.new_empty(B, *map_size, nH * hd)
    for start, stop in chunks:
        k, v = gather_keys_values(kv_source[start:stop], key_index, nH)  # (b, G, N, hd) each
        o = F.scaled_dot_product_attention(q[start:stop].flatten(1, 2), k, v, attn_mask=bias.flatten(0, 1), scale=scale)
        window_heads_to_map(o.unflatten(1, (n_windows, nH)), map_size, out[start:stop])
    return out


def windowed_focal_attention(
    q: torch.Tensor,
    kv_source: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    dropout_p: float,
    map_size: tuple[int, int],
) -> torch.Tensor:
    """Attention of every window's queries to its gathered keys, returned as a (B, Hp, Wp, C) map.

    q: (B, nW, nH, n, hd); kv_source: (B, L, 2C) with k then v, heads-major within each; key_index: (nW, N)
    into the source; bias: (nW, nH, n, N), shared by the images. On CPU without dropout the images are
    attended a few at a time (``attend_in_chunks``); elsewhere in one ``scaled_dot_product_attention`` call.
    """
    bias, kv_source = bias.to(q.dtype), kv_source.to(q.dtype)
    if q.device.type == "cpu" and dropout_p == 0.0:
        return attend_in_chunks(q, kv_source, key_index, bias, scale, map_size)
    B, n_windows, nH, n, hd = q.shape
    k, v = gather_keys_values(kv_source, key_index, nH)  # (B, nW*nH, N, hd) each
    bias = bias.flatten(0, 1)[None]  # (1, nW*nH, n, N)
    out = focal_attention(q.flatten(1, 2), k, v, bias, scale, dropout_p)  # (B, nW*nH, n, hd)
    return window_heads_to_map(out.unflatten(1, (n_windows, nH)), map_size)


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
        tables = [self.relative_position_bias_table.t()]
        if self.expand_size > 0:
            tables.append(self.relative_position_bias_table_to_neighbors.flatten(2)[0])
        tables.extend(self.relative_position_bias_table_to_windows)
        return torch.cat(tables, 1)

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
        B, Hp, Wp, C = x.shape
        ws, nH = self.window_size, self.num_heads
        qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
        q = map_to_window_heads(qkv[..., :C], ws, nH)  # (B, nW, nH, ws*ws, hd)

        # Key source: full-resolution k/v, then k/v of each pooled map, then a zero slot: (B, L, 2C).
        kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        sources = [qkv[..., C:].flatten(1, 2)]
        sources += [F.linear(p, kv_weight, kv_bias).flatten(1, 2) for p in pooled]
        sources.append(qkv.new_zeros(B, 1, 2 * C))
        kv_source = torch.cat(sources, 1)

        columns = self.merged_columns
        key_index, key_mask = key_index[:, columns], key_mask[:, :, columns]  # repeated ring keys merged
        bias = self.merged_position_bias()[None] + key_mask[:, None]  # (nW, nH, ws*ws, N')
        dropout_p = self.attn_drop if self.training else 0.0
        out = windowed_focal_attention(q, kv_source, key_index, bias, self.scale, dropout_p, (Hp, Wp))
        return self.proj_drop(self.proj(out))
