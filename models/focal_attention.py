"""Focal window attention (v1), exact to the released implementation, computed as gathered attention.

The released code builds the keys of a window from 4 rolled copies of k/v, a boolean index and an
``nn.Unfold`` per pooled level, then adds three kinds of position bias piece by piece. Here the same keys
are read through a precomputed index (``focal_geometry.key_layout``), the same biases are read from the
concatenated tables through one precomputed index, and one attention function does the rest:
``reference_focal_attention``, the paper's math in plain PyTorch (gather every window's keys through the index, one
``scaled_dot_product_attention`` with the bias). Two faster implementations compute the same thing with the same
arguments, each in its own module and tested against the reference: ``fused_focal_attention`` (two Triton
kernels that read the keys through the index, for CUDA) and ``cpu_focal_attention`` (batched products image by
image, a few windows at a time, with a hand-written backward). ``attention_path`` chooses one from the module's
``attn_impl`` (see ``ATTN_IMPLS``). Key order, wrap-around and masks are those of the release, so released
weights give the same outputs (see tests/test_golden.py). Ring keys the release repeats (same token, own bias
column) are merged into one key whose bias is the log-sum-exp of theirs (``focal_geometry.merged_key_columns``),
which leaves the softmax unchanged up to rounding.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from . import cpu_focal_attention, fused_focal_attention
from .attention_layout import full_bias, gather_keys_values, key_value_rows, map_to_window_heads, window_heads_to_map
from .focal_geometry import (
    merged_key_columns,
    pooled_window_size,
    relative_position_index,
    released_valid_ind_rolled,
    released_valid_ind_unfold,
)

# The choices of ``attn_impl`` (see ``attention_path``).
ATTN_IMPLS = ("auto", "reference", "fused", "chunked")


def ring_size(window_size: int, expand_size: int) -> int:
    """Number of ring keys per window: 4 * ws^2 - 4 * (ws - e)^2 (duplicates included)."""
    return 4 * window_size**2 - 4 * (window_size - expand_size) ** 2


def head_scale(dim: int, num_heads: int, qk_scale: float | None) -> float:
    """The q k^T scale, ``qk_scale`` or head_dim ** -0.5; refuses a head count that does not divide ``dim``."""
    if dim % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide the stage dimension {dim}")
    return qk_scale or (dim // num_heads) ** -0.5


def reference_focal_attention(
    qkv: Tensor,
    pooled_kv: Tensor,
    key_index: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q k^T * scale + bias + mask) v of every window's queries over the keys its index names, as a map.

    qkv: (B, Hp, Wp, 3C), the map's q, k, v (heads-major within each); pooled_kv: (B, L_pooled, 2C) in qkv's
    dtype, k then v of the pooled maps (and v1's zero slot); key_index: (nW, N) into the key source [map tokens
    row-major, pooled rows]; bias: (1 or nW, nH, ws*ws, N), shared by the images (and by the windows if its first
    size is 1), which gives the head count and the window size; mask: a constant (nW, 1, ws*ws, N) added to it (v1's
    -100 for keys a query must not see), or None. Returns (B, Hp, Wp, C) in qkv's dtype. The fast paths
    (``fused_focal_attention.fused_focal_attention``, ``cpu_focal_attention.chunked_focal_attention``) take exactly
    these arguments but ``dropout_p``, which only the reference applies (to the attention probabilities, as
    ``scaled_dot_product_attention`` does).
    """
    (n_windows, _), (num_heads, n) = key_index.shape, bias.shape[1:3]
    C = qkv.shape[-1] // 3
    q = map_to_window_heads(qkv[..., :C], math.isqrt(n), num_heads).flatten(1, 2)  # (B, nW*nH, ws*ws, hd)
    kv_source = torch.cat([qkv[..., C:].flatten(1, 2), pooled_kv], 1)  # (B, L, 2C)
    kv = gather_keys_values(kv_source, key_value_rows(key_index, num_heads))  # (B, 2, nW, nH, N, hd)
    k, v = kv.flatten(2, 3).unbind(1)  # (B, nW*nH, N, hd) each
    mask = None if mask is None else mask.to(qkv.dtype)
    bias = full_bias(bias.to(qkv.dtype), mask, n_windows).flatten(0, 1)[None]  # (1, nW*nH, ws*ws, N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return window_heads_to_map(out.unflatten(1, (n_windows, num_heads)), tuple(qkv.shape[1:3]))


def attention_path(qkv: torch.Tensor, dropout_p: float, attn_impl: str = "auto") -> str:
    """Which implementation ``attend_and_project`` runs for ``attn_impl``: "reference", "fused" or "chunked".

    - "auto" (default): "fused" on CUDA when the kernels support the call (``fused_focal_attention.supports``:
      fp32/bf16/fp16, no attention dropout, deterministic algorithms not asked for), "chunked" on CPU without
      attention dropout, "reference" otherwise;
    - "reference": ``reference_focal_attention`` on any device, dtype, dropout and batch size;
    - "fused": the Triton kernels (CUDA; CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``, as the
      tests run them); a call they do not support is refused with the reason;
    - "chunked": the CPU path (``cpu_focal_attention``); attention dropout is refused.

    While ``torch.export`` traces the model (also under ``torch.onnx.export(dynamo=True)``) every choice takes the
    reference: the chunked path loops over the images, which would fix the batch size in the exported graph, and the
    fused kernels are not exportable ops.
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if torch.compiler.is_exporting():
        return "reference"
    fused_supported = fused_focal_attention.supports(qkv, dropout_p)
    if attn_impl == "auto":
        if qkv.device.type == "cuda" and fused_supported:
            return "fused"
        return "chunked" if qkv.device.type == "cpu" and dropout_p == 0.0 else "reference"
    if attn_impl == "fused" and not fused_supported:
        raise ValueError(
            f"attn_impl='fused' needs triton, fp32/bf16/fp16 without attention dropout or deterministic algorithms; "
            f"got {qkv.dtype}, dropout {dropout_p}"
        )
    if attn_impl == "chunked" and dropout_p:
        raise ValueError(f"attn_impl='chunked' has no attention dropout (got {dropout_p}): use 'reference'")
    return attn_impl


class KeyIndexedAttention(nn.Module):
    """What v1's ``FocalWindowAttention`` and v2's ``TopKFocalAttention`` share: the qkv projection of the map and
    of the pooled maps, the attention of every window to the keys its index names (``attend_and_project``)
    and the output projection.

    Subclasses own the parameters (``qkv``, ``proj``, ``proj_drop``) and attributes (``dim``, ``scale``,
    ``attn_drop``, ``window_size``, ``num_heads``) under their released names; ``zero_slots`` zero keys end the
    key source (v1 points its padded keys there). ``attn_impl`` chooses the implementation (``attention_path``); the
    models set it with ``set_attn_impl``.
    """

    zero_slots = 0
    attn_impl = "auto"

    def attend_and_project(
        self,
        x: torch.Tensor,
        pooled: list[torch.Tensor],
        key_index: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: map (B, Hp, Wp, C); pooled: maps (B, h_l, w_l, C); key_index (nW, N) into [map tokens, pooled tokens,
        zero slots]; bias (1 or nW, nH, ws*ws, N) plus the constant mask (nW, 1, ws*ws, N) if given. Returns
        (B, Hp, Wp, C)."""
        qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
        C = self.dim
        kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        pooled_kv = [F.linear(p, kv_weight, kv_bias).flatten(1, 2) for p in pooled]  # (B, h_l*w_l, 2C) each
        pooled_kv = torch.cat([*pooled_kv, qkv.new_zeros(x.shape[0], self.zero_slots, 2 * C)], 1)  # (B, L_pooled, 2C)
        dropout_p = self.attn_drop if self.training else 0.0
        path = attention_path(qkv, dropout_p, self.attn_impl)
        if path == "fused":
            attend = fused_focal_attention.fused_focal_attention
        elif path == "chunked":
            attend = cpu_focal_attention.chunked_focal_attention
        else:
            attend = partial(reference_focal_attention, dropout_p=dropout_p)
        out = attend(qkv, pooled_kv.to(qkv.dtype), key_index, bias, mask, self.scale)  # (B, Hp, Wp, C)
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
        n_pooled_keys = sum(pooled_window_size(focal_window, k) ** 2 for k in range(num_pooled_levels))
        columns = merged_key_columns(window_size, expand_size, n_pooled_keys)  # (N', m <= 2)
        self.register_buffer("merged_columns", columns[:, 0].contiguous(), persistent=False)
        self.register_buffer("merged_bias_index", bias_index[..., columns[:, 0]], persistent=False)  # (nH, ws^2, N')
        # Merged keys that read two released columns (a ring token is in at most two rolled groups).
        repeated = (columns[:, -1] >= 0).nonzero()[:, 0] if columns.shape[1] == 2 else columns.new_zeros(0)
        self.register_buffer("repeated_keys", repeated, persistent=False)
        self.register_buffer("repeated_bias_index", bias_index[..., columns[repeated, -1]], persistent=False)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _build_bias_index(self) -> torch.Tensor:
        """(nH, ws^2, N) index of every (head, query, key slot) bias into ``_flat_bias_tables()``.

        Each table is read in its own storage order (the in-window table is (entries, nH), the others
        heads-first), so ``merged_position_bias`` reads them all with one gather (and one more for the
        repeated keys).
        """
        ws, ws2, nH = self.window_size, self.window_size**2, self.num_heads
        heads = torch.arange(nH)[:, None, None]  # (nH, 1, 1)
        parts = [relative_position_index(ws, ws)[None] * nH + heads]  # table (entries, nH)
        offset = (2 * ws - 1) ** 2 * nH
        if self.expand_size > 0:
            n_ring = ring_size(ws, self.expand_size)
            parts.append(offset + torch.arange(nH * ws2 * n_ring).view(nH, ws2, n_ring))  # table (1, nH, ws^2, n_ring)
            offset += nH * ws2 * n_ring
        for k in range(self.num_pooled_levels):
            size = pooled_window_size(self.focal_window, k)
            entries = (ws + size - 1) ** 2
            parts.append(offset + heads * entries + relative_position_index(ws, size)[None])  # table (nH, entries)
            offset += nH * entries
        return torch.cat(parts, 2)

    def _flat_bias_tables(self) -> torch.Tensor:
        """All bias tables flattened in storage order and concatenated: (total entries,).

        Flattening (not transposing) keeps each table's gradient a contiguous slice laid out like the table,
        as DDP's gradient buckets expect (no stride warning, no copy per step).
        """
        ring = [self.relative_position_bias_table_to_neighbors] if self.expand_size > 0 else []
        tables = [self.relative_position_bias_table, *ring, *self.relative_position_bias_table_to_windows]
        return torch.cat([table.reshape(-1) for table in tables])

    def merged_position_bias(self) -> torch.Tensor:
        """Bias of every query to every merged key (repeated ring keys log-sum-exp'ed): (nH, ws^2, N')."""
        tables = self._flat_bias_tables()
        bias = tables[self.merged_bias_index]  # (nH, ws^2, N')
        if self.repeated_keys.numel():
            repeated = tables[self.repeated_bias_index]  # (nH, ws^2, n_repeated)
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

    def merge_layout(self, key_index: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``focal_geometry.key_layout``'s key_index (nW, N) and key_mask (nW, ws^2, N), in released key order ->
        the same with the repeated ring keys merged: (nW, N'), (nW, ws^2, N'), the layout ``forward`` reads."""
        columns = self.merged_columns
        return key_index[:, columns].contiguous(), key_mask[:, :, columns].contiguous()

    def forward(
        self, x: torch.Tensor, pooled: list[torch.Tensor], key_index: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """x: padded (shifted) map (B, Hp, Wp, C); pooled: maps (B, gh_k, gw_k, C); returns (B, Hp, Wp, C).

        key_index (nW, N') and key_mask (nW, ws^2, N'): ``merge_layout`` of ``focal_geometry.key_layout``.
        """
        bias = self.merged_position_bias()[None]  # (1, nH, ws*ws, N')
        return self.attend_and_project(x, pooled, key_index, bias, key_mask[:, None])
