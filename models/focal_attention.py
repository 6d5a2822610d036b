"""Focal window attention (v1), exact to the released implementation, computed as gathered attention.

The released code builds the keys of a window from 4 rolled copies of k/v, a boolean index and an
``nn.Unfold`` per pooled level, then adds three kinds of position bias piece by piece. Here the same keys
are read through a precomputed index (``focal_geometry.key_layout``), the same biases are read from the
concatenated tables through one precomputed index, and ``windowed_focal_attention`` does the rest: on CUDA two
Triton kernels that read the keys through the index (``fused_focal_attention.py``), on CPU batched matrix
products image by image and a few windows at a time, with attention dropout (or float64 on CUDA, or while
``torch.export`` traces, or when ``attn_impl="reference"`` asks for it) one ``scaled_dot_product_attention`` call
over gathered keys (``attention_path`` chooses). Key order, wrap-around and masks are those of the
release, so released weights give the same outputs (see tests/test_golden.py). Two rewrites leave the softmax
unchanged up to rounding:

- ring keys the release repeats (same token, own bias column) are merged into one key whose bias is the
  log-sum-exp of theirs (``focal_geometry.merged_key_columns``);
- on CPU (``ImageAttention``) each image's queries and key source are built once and its windows attended
  in chunks of about ``CHUNK_BYTES``, in buffers reused throughout, so the gathered keys (3-5x the size of
  the map) and the scores stay in cache between products and nothing is allocated per image; the scores
  start from the bias inside ``baddbmm`` and the softmax runs in place (faster there than the fused flash
  kernel at 49 queries per window), and training goes through ``PerImageFocalAttention``, which saves qkv
  and the pooled k/v instead of the gathered keys and recomputes the probabilities.
"""

from __future__ import annotations

import math
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

# Devices whose attention runs in the fused Triton kernels under ``attn_impl="auto"`` (tests add "cpu", where Triton's
# interpreter runs them).
FUSED_DEVICES = {"cuda"}
# The choices of ``attn_impl`` (see ``attention_path``).
ATTN_IMPLS = ("auto", "reference")


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


def leading(buffer: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous ``shape`` view of the start of a contiguous buffer (a chunk's share of a buffer sized for the
    largest chunk)."""
    return buffer.view(-1)[: math.prod(shape)].view(shape)


def chunk_keys_values(kv_source: torch.Tensor, flat_rows: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Gathered keys and values of some windows of one image: kv_source (L, 2C), flat_rows (2 * G * N) from
    ``key_value_rows`` -> (2, G, N, hd), in ``buffer`` (2, G_max, N, hd)."""
    _, _, n_keys, hd = buffer.shape
    kv = leading(buffer, flat_rows.numel(), hd)
    torch.index_select(kv_source.view(-1, hd), 0, flat_rows, out=kv)
    return kv.view(2, -1, n_keys, hd)


def image_windows(
    x: torch.Tensor, window_size: int, num_heads: int, out: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """One image's (Hp, Wp, C) map (any strides) times ``scale`` -> its windows (nW*nH, ws*ws, hd) in ``out``, in
    one pass."""
    x = window_view(x, window_size, num_heads)  # (nWh, nWw, nH, ws, ws, hd)
    torch.mul(x, scale, out=out.view(x.shape))
    return out


def image_from_windows(windows: torch.Tensor, out: torch.Tensor) -> None:
    """``image_windows`` undone: windows (nW*nH, ws*ws, hd) written into one image's (Hp, Wp, C) map ``out`` (any
    strides)."""
    _, n, hd = windows.shape
    target = window_view(out, round(n**0.5), out.shape[-1] // hd)  # (nWh, nWw, nH, ws, ws, hd)
    target.copy_(windows.view(target.shape))


def image_key_source(qkv: torch.Tensor, pooled_kv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One image's keys and values in key-index order, [map tokens row-major, pooled rows]: qkv (Hp, Wp, 3C),
    pooled_kv (L_pooled, 2C) -> ``out`` (L, 2C)."""
    Hp, Wp, C3 = qkv.shape
    out[: Hp * Wp].view(Hp, Wp, -1).copy_(qkv[..., C3 // 3 :])
    out[Hp * Wp :].copy_(pooled_kv)
    return out


def full_bias(bias: torch.Tensor, mask: torch.Tensor | None, n_windows: int) -> torch.Tensor:
    """The attention bias as one (nW, nH, n, N) tensor: ``bias`` (1 or nW, nH, n, N) plus ``mask`` (nW, 1, n, N)."""
    total = bias if mask is None else bias + mask
    return total.expand(n_windows, *total.shape[1:])


def image_probabilities(scaled_q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) of some windows of one image: scaled_q (G, n, hd), k (G, N, hd), ``scores``
    (G, n, N) holding the bias on entry and the probabilities on return.

    The product adds onto the bias and the softmax runs in place: one buffer, no extra pass (measured faster on
    CPU than the fused flash kernel at these window sizes).
    """
    torch.baddbmm(scores, scaled_q, k.transpose(1, 2), out=scores)  # (not baddbmm_, which FLOP counters miss)
    return torch.softmax(scores, -1, out=scores)


# Bytes of per-window work (scores, their gradient, gathered keys and values, their gradient) the CPU attention
# handles at once: small enough to stay in cache from one product to the next.
CHUNK_BYTES = 8 * 2**20


def window_bytes(num_heads: int, num_queries: int, num_keys: int, head_dim: int, element_size: int) -> int:
    """Per-key work of one window counted against ``CHUNK_BYTES``: scores and their gradient, gathered keys and values
    and their gradient."""
    return num_heads * (2 * num_queries * num_keys + 4 * num_keys * head_dim) * element_size


class ImageAttention:
    """The CPU attention of one image after another, a few windows at a time, in buffers reused throughout.

    qkv (B, Hp, Wp, 3C), pooled_kv (B, L_pooled, 2C), rows (2, nW, nH, N) from ``key_value_rows``, bias
    (1 or nW, nH, n, N) and mask (nW, 1, n, N) or None, summed into each chunk's scores (the (nW, nH, n, N) sum is
    never built: the position bias is shared by the windows). Windows and heads are flattened to G = nW * nH. Each
    image's scaled queries (window layout) and key source are built once; its windows are then attended in chunks
    of about ``CHUNK_BYTES`` of per-key work, so the gathered keys and the scores stay in cache (measured faster
    than whole images or whole batches) and nothing is allocated per image or chunk.
    """

    def __init__(
        self,
        qkv: torch.Tensor,
        pooled_kv: torch.Tensor,
        rows: torch.Tensor,
        bias: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> None:
        _, Hp, Wp, C3 = qkv.shape
        _, n_windows, nH, n_keys = rows.shape
        self.qkv, self.pooled_kv, self.bias, self.mask, self.scale = qkv, pooled_kv, bias, mask, scale
        self.num_heads, self.head_dim = nH, C3 // (3 * nH)
        n = (Hp * Wp) // n_windows
        self.window_size = round(n**0.5)
        per_window = window_bytes(nH, n, n_keys, self.head_dim, qkv.element_size())
        n_chunks = math.ceil(n_windows / max(1, CHUNK_BYTES // per_window))
        step = math.ceil(n_windows / n_chunks)  # windows per chunk, balanced
        self.window_ranges = [(w, min(w + step, n_windows)) for w in range(0, n_windows, step)]
        self.chunks = [(w0 * nH, w1 * nH) for w0, w1 in self.window_ranges]  # ranges of G = window * nH + head
        self.chunk_rows = [rows[:, w0:w1].reshape(-1) for w0, w1 in self.window_ranges]
        new = qkv.new_empty
        self.scaled_q = new(n_windows * nH, n, self.head_dim)
        self.key_source = new(Hp * Wp + pooled_kv.shape[1], 2 * nH * self.head_dim)
        self.keys_values = new(2, step * nH, n_keys, self.head_dim)
        self.probabilities = new(step * nH, n, n_keys)

    def load(self, i: int) -> None:
        """Build image ``i``'s scaled queries (G, n, hd) and key source (L, 2C)."""
        qkv = self.qkv[i]
        image_windows(qkv[..., : qkv.shape[-1] // 3], self.window_size, self.num_heads, self.scaled_q, self.scale)
        image_key_source(qkv, self.pooled_kv[i], self.key_source)

    def probabilities_of(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (Gc, N, hd) and attention probabilities (Gc, n, N) of one chunk of the loaded image."""
        (g0, g1), (w0, w1) = self.chunks[chunk], self.window_ranges[chunk]
        k, v = chunk_keys_values(self.key_source, self.chunk_rows[chunk], self.keys_values)
        scores = leading(self.probabilities, g1 - g0, *self.probabilities.shape[1:])
        initial = scores.view(w1 - w0, self.num_heads, *scores.shape[1:])  # (Wc, nH, n, N)
        bias = self.bias if self.bias.shape[0] == 1 else self.bias[w0:w1]
        if self.mask is None:
            initial.copy_(bias)
        else:
            torch.add(bias, self.mask[w0:w1], out=initial)
        return k, v, image_probabilities(self.scaled_q[g0:g1], k, scores)

    def forward(self) -> torch.Tensor:
        """Attended values of every image: (B, Hp, Wp, C)."""
        out = self.qkv.new_empty(*self.qkv.shape[:3], self.qkv.shape[-1] // 3)
        attended = torch.empty_like(self.scaled_q)
        for i in range(self.qkv.shape[0]):
            self.load(i)
            for chunk, (g0, g1) in enumerate(self.chunks):
                _, v, p = self.probabilities_of(chunk)
                torch.bmm(p, v, out=attended[g0:g1])
            image_from_windows(attended, out[i])
        return out

    def backward(
        self, grad_out: torch.Tensor, out: torch.Tensor, need_qkv: bool, need_pooled: bool, need_bias: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of qkv, pooled_kv and the bias (summed over images, and over windows if shared) given the output
        and its gradient."""
        qkv, pooled_kv, nH, hd, ws = self.qkv, self.pooled_kv, self.num_heads, self.head_dim, self.window_size
        B, Hp, Wp, C3 = qkv.shape
        G, n = self.scaled_q.shape[:2]
        grad_qkv = torch.empty_like(qkv) if need_qkv else None
        grad_pooled = torch.empty_like(pooled_kv) if need_pooled else None
        accumulated = torch.promote_types(self.bias.dtype, torch.float32)
        grad_bias = torch.zeros_like(self.bias, dtype=accumulated) if need_bias else None
        shared_bias = self.bias.shape[0] == 1
        window_sum = self.bias.new_empty(self.bias.shape[1:], dtype=accumulated) if need_bias and shared_bias else None
        grad_scores, grad_keys_values = torch.empty_like(self.probabilities), torch.empty_like(self.keys_values)
        grad_source, grad_q, do = (
            torch.empty_like(self.key_source),
            torch.empty_like(self.scaled_q),
            torch.empty_like(self.scaled_q),
        )
        # rowsum(dO * O) of every query and head, in window layout: (B, G, n, 1).
        delta = (grad_out * out).unflatten(-1, (nH, hd)).sum(-1)  # (B, Hp, Wp, nH)
        delta = map_to_window_heads(delta, ws, nH).view(B, G, n, 1)
        for i in range(B):
            self.load(i)
            image_windows(grad_out[i], ws, nH, do)
            grad_source.zero_()
            for chunk, ((g0, g1), (w0, w1)) in enumerate(zip(self.chunks, self.window_ranges)):
                k, v, p = self.probabilities_of(chunk)
                ds = leading(grad_scores, *p.shape)
                torch.baddbmm(delta[i, g0:g1], do[g0:g1], v.transpose(1, 2), beta=-1, out=ds).mul_(p)  # d scores
                if need_bias:
                    ds_windows = ds.view(w1 - w0, nH, n, -1)  # (Wc, nH, n, N)
                    if shared_bias:
                        grad_bias[0].add_(torch.sum(ds_windows, 0, out=window_sum))
                    else:
                        grad_bias[w0:w1].add_(ds_windows)
                if need_qkv:
                    torch.bmm(ds, k, out=grad_q[g0:g1])
                if need_qkv or need_pooled:
                    grad_kv = leading(grad_keys_values, 2, *k.shape)
                    torch.bmm(ds.transpose(1, 2), self.scaled_q[g0:g1], out=grad_kv[0])
                    torch.bmm(p.transpose(1, 2), do[g0:g1], out=grad_kv[1])
                    grad_source.view(-1, hd).index_add_(0, self.chunk_rows[chunk], grad_kv.view(-1, hd))
            if need_qkv:
                image_from_windows(grad_q.mul_(self.scale), grad_qkv[i, ..., : C3 // 3])
                grad_qkv[i, ..., C3 // 3 :].copy_(grad_source[: Hp * Wp].view(Hp, Wp, -1))
            if need_pooled:
                grad_pooled[i].copy_(grad_source[Hp * Wp :])
        return grad_qkv, grad_pooled, grad_bias.to(self.bias.dtype) if need_bias else None


class PerImageFocalAttention(torch.autograd.Function):
    """Focal attention on CPU (``ImageAttention``), with a memory-lean backward.

    Inputs: qkv (B, Hp, Wp, 3C), pooled_kv (B, L_pooled, 2C), rows (2, nW, nH, N) from ``key_value_rows``, bias
    (1 or nW, nH, n, N), a constant mask (nW, 1, n, N) or None, and the scale. Output: the (B, Hp, Wp, C) map of
    attended values. Nothing per key is saved: the backward gathers the keys again, recomputes the probabilities
    and writes the gradients of qkv, of the pooled k/v (scattered back through the index) and of the bias.
    """

    @staticmethod
    def forward(ctx, qkv, pooled_kv, rows, bias, mask, scale):
        out = ImageAttention(qkv, pooled_kv, rows, bias, mask, scale).forward()
        ctx.scale = scale
        ctx.save_for_backward(qkv, pooled_kv, rows, bias, mask, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        qkv, pooled_kv, rows, bias, mask, out = ctx.saved_tensors
        need_qkv, need_pooled, _, need_bias = ctx.needs_input_grad[:4]
        attention = ImageAttention(qkv, pooled_kv, rows, bias, mask, ctx.scale)
        grad_qkv, grad_pooled, grad_bias = attention.backward(grad_out, out, need_qkv, need_pooled, need_bias)
        return grad_qkv, grad_pooled, None, grad_bias, None, None


def attend_per_image(
    qkv: torch.Tensor,
    pooled_kv: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    num_heads: int,
) -> torch.Tensor:
    """``windowed_focal_attention`` image by image and a few windows at a time, without dropout (the CPU path):
    qkv (B, Hp, Wp, 3C), pooled_kv (B, L_pooled, 2C), key_index (nW, N), bias (1 or nW, nH, ws*ws, N), mask
    (nW, 1, ws*ws, N) or None -> (B, Hp, Wp, C)."""
    rows = key_value_rows(key_index, num_heads)
    if torch.is_grad_enabled() and (qkv.requires_grad or pooled_kv.requires_grad or bias.requires_grad):
        return PerImageFocalAttention.apply(qkv, pooled_kv, rows, bias, mask, scale)
    return ImageAttention(qkv, pooled_kv, rows, bias, mask, scale).forward()


def attention_path(qkv: torch.Tensor, dropout_p: float, attn_impl: str = "auto") -> str:
    """Which implementation ``windowed_focal_attention`` runs: "fused", "per_image" or "reference".

    ``attn_impl="reference"`` always takes the reference (gathered keys, one ``scaled_dot_product_attention``), which
    runs on any device, dtype and batch size. ``"auto"`` takes the fused Triton kernels on ``FUSED_DEVICES`` when they
    support the call, the per-image path on CPU without dropout, and the reference otherwise; and the reference while
    ``torch.export`` traces the model (also under ``torch.onnx.export(dynamo=True)``): the per-image path loops over
    the images, which would fix the batch size in the exported graph, and the fused kernels are not exportable ops.
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl == "reference" or torch.compiler.is_exporting():
        return "reference"
    if qkv.device.type in FUSED_DEVICES and fused_focal_attention.supports(qkv, dropout_p):
        return "fused"
    if qkv.device.type == "cpu" and dropout_p == 0.0:
        return "per_image"
    return "reference"


def windowed_focal_attention(
    project: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    key_index: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    window_size: int,
    num_heads: int,
    attn_impl: str = "auto",
) -> torch.Tensor:
    """Attention of every window's queries to its keys, returned as a (B, Hp, Wp, C) map.

    ``project()`` gives qkv: (B, Hp, Wp, 3C), q, k, v of the map (heads-major within each), and pooled_kv:
    (B, L_pooled, 2C), k then v of the pooled maps (and v1's zero slot); it is called here so that the paths which
    copy queries and keys out of qkv free it before attending. key_index: (nW, N) into the key source [map tokens
    row-major, pooled rows]; bias: (1 or nW, nH, ws*ws, N), shared by the images (and by the windows if its first
    size is 1), plus the constant ``mask`` (nW, 1, ws*ws, N) unless None. Three paths compute the same thing, chosen
    by ``attention_path`` from ``attn_impl``: the fused Triton kernels (``fused_focal_attention``, which read the keys
    through the index); on CPU image by image (``attend_per_image``); the reference, one
    ``scaled_dot_product_attention`` call over gathered keys.
    """
    qkv, pooled_kv = project()
    pooled_kv = pooled_kv.to(qkv.dtype)
    n_windows = key_index.shape[0]
    path = attention_path(qkv, dropout_p, attn_impl)
    if path == "fused":
        return fused_focal_attention.fused_focal_attention(
            qkv, pooled_kv, key_index, full_bias(bias, mask, n_windows), scale, window_size, num_heads
        )
    bias, mask = bias.to(qkv.dtype), None if mask is None else mask.to(qkv.dtype)
    if path == "per_image":
        return attend_per_image(qkv, pooled_kv, key_index, bias, mask, scale, num_heads)
    C = qkv.shape[-1] // 3
    q = map_to_window_heads(qkv[..., :C], window_size, num_heads)  # (B, nW, nH, ws*ws, hd)
    kv_source = torch.cat([qkv[..., C:].flatten(1, 2), pooled_kv], 1)  # (B, L, 2C)
    map_size = tuple(qkv.shape[1:3])
    del qkv, pooled_kv  # copied out: free the projection before the attention's own buffers
    kv = gather_keys_values(kv_source, key_value_rows(key_index, num_heads))  # (B, 2, nW, nH, N, hd)
    k, v = kv.flatten(2, 3).unbind(1)  # (B, nW*nH, N, hd) each
    bias = full_bias(bias, mask, n_windows).flatten(0, 1)[None]  # (1, nW*nH, n, N)
    out = focal_attention(q.flatten(1, 2), k, v, bias, scale, dropout_p)  # (B, nW*nH, n, hd)
    return window_heads_to_map(out.unflatten(1, (n_windows, num_heads)), map_size)


class KeyIndexedAttention(nn.Module):
    """What v1's ``FocalWindowAttention`` and v2's ``TopKFocalAttention`` share: the qkv projection of the map and
    of the pooled maps, the attention of every window to the keys its index names (``windowed_focal_attention``)
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

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            qkv = self.qkv(x)  # (B, Hp, Wp, 3C)
            C = self.dim
            kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
            pooled_kv = [F.linear(p, kv_weight, kv_bias).flatten(1, 2) for p in pooled]  # (B, h_l*w_l, 2C) each
            zeros = qkv.new_zeros(x.shape[0], self.zero_slots, 2 * C)
            return qkv, torch.cat([*pooled_kv, zeros], 1)

        dropout_p = self.attn_drop if self.training else 0.0
        out = windowed_focal_attention(
            project, key_index, bias, mask, self.scale, dropout_p, self.window_size, self.num_heads, self.attn_impl
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
