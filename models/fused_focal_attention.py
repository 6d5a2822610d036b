"""Focal window attention in two Triton kernels (forward, backward) that read the keys through the key index.

The batched path gathers every window's keys and values into a tensor 3-5x the size of the map before calling
``scaled_dot_product_attention``, and its backward scatters them back with ``index_add_``: on a GPU those copies
cost more than the attention itself. Here each program loads its window's queries, keys and values straight from the
qkv projection of the map and the (small) k/v of the pooled maps, through ``key_index``, and writes its output
straight into the (B, Hp, Wp, C) map, so nothing is gathered, scattered, concatenated or sliced in memory:

- forward, one program per (window, head, image): online softmax over key blocks (flash attention), bias read
  from the (nW, nH, ws*ws, N) tensor, the log-sum-exp of every query kept for the backward;
- backward, one program per (window, head, key block, chunk of images): the probabilities recomputed from the
  log-sum-exp, key and value gradients added atomically (fp32, relaxed order) into the rows they were read
  from, query gradients likewise (all into one qkv-shaped buffer), and the bias gradient summed over the chunk
  in registers (chunks are summed after).

The two kernels are custom operators (``focal::fused_attention_forward`` / ``_backward``) chained by autograd, so
``torch.compile`` sees each as one call. ``fused_focal_attention`` computes
``focal_attention.reference_focal_attention`` with the same arguments (no dropout): softmax(q k^T * scale + bias +
mask) v with the same keys; fp32 inputs use IEEE fp32 products (no TF32); any head dimension (padded to a power of
two).
Used on CUDA for fp32/bf16/fp16 without attention dropout (``supports``); tests run the same kernels on CPU tensors
through Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .attention_layout import full_bias

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the Linux CUDA builds of torch
    triton = None

BLOCK_K = 64  # keys per block
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_PROGRAMS = 2048  # backward: enough programs to fill a large GPU, images split into chunks to get there


def supports(qkv: torch.Tensor, dropout_p: float) -> bool:
    """Whether the fused kernels run this attention: Triton present, a supported dtype, no attention dropout, and
    deterministic algorithms not asked for (the backward's atomic additions run in no fixed order)."""
    return (
        triton is not None
        and dropout_p == 0.0
        and qkv.dtype in FUSED_DTYPES
        and not torch.are_deterministic_algorithms_enabled()
    )


if triton is not None:

    @triton.jit
    def _query_pixels(window, windows_x, map_width, WINDOW: tl.constexpr, BLOCK_Q: tl.constexpr):
        """Pixel index (y * Wp + x) of each of the window's queries, row-major, and which of the BLOCK_Q are real."""
        i = tl.arange(0, BLOCK_Q)
        y = (window // windows_x) * WINDOW + i // WINDOW
        x = (window % windows_x) * WINDOW + i % WINDOW
        return y * map_width + x, i < WINDOW * WINDOW

    @triton.jit
    def _head_columns(head, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
        """Channels of ``head`` as a (1, HEAD_PAD) row (the head dimension padded to a ``tl.dot`` size) and which
        of them are real."""
        d = tl.arange(0, HEAD_PAD)[None, :]
        return head * HEAD_DIM + d, d < HEAD_DIM

    @triton.jit
    def _key_rows(map_ptr, pooled_ptr, b, tokens, map_tokens, pooled_tokens, dim):
        """Where each key's k row starts (its v row is ``dim`` further): key source token ``t`` is pixel ``t`` of a
        (B, Hp, Wp, 3C) qkv map (k after the C query channels) when t < Hp * Wp, else row t - Hp * Wp of the
        (B, L_pooled, 2C) pooled k/v."""
        map_rows = map_ptr + (b * map_tokens + tokens) * (3 * dim) + dim
        pooled_rows = pooled_ptr + (b * pooled_tokens + tokens - map_tokens) * (2 * dim)
        return tl.where(tokens < map_tokens, map_rows, pooled_rows)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b accumulated in fp32; IEEE fp32 products (no TF32) when IEEE."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _forward_kernel(
        qkv_ptr, pooled_ptr, index_ptr, bias_ptr, out_ptr, lse_ptr,
        scale, num_heads, windows_x, map_width, map_tokens, pooled_tokens, num_keys, dim,
        WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        scale = tl.cast(scale, tl.float32)  # torch.compile passes the Python float as float64
        window_head = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        window, head = window_head // num_heads, window_head % num_heads
        head_cols, col_valid = _head_columns(head, HEAD_DIM, HEAD_PAD)
        pixels, q_valid = _query_pixels(window, windows_x, map_width, WINDOW, BLOCK_Q)
        pixels = b * map_tokens + pixels
        q_mask = q_valid[:, None] & col_valid
        q = tl.load(qkv_ptr + pixels[:, None] * (3 * dim) + head_cols, mask=q_mask, other=0.0)
        bias_rows = bias_ptr + (window_head * WINDOW * WINDOW + tl.arange(0, BLOCK_Q)) * num_keys

        row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, HEAD_PAD], tl.float32)
        for start in range(0, num_keys, BLOCK_K):
            j = start + tl.arange(0, BLOCK_K)
            key_valid = j < num_keys
            tokens = tl.load(index_ptr + window * num_keys + j, mask=key_valid, other=0)
            k_rows = _key_rows(qkv_ptr, pooled_ptr, b, tokens, map_tokens, pooled_tokens, dim)[:, None] + head_cols
            k_mask = key_valid[:, None] & col_valid
            k = tl.load(k_rows, mask=k_mask, other=0.0)
            v = tl.load(k_rows + dim, mask=k_mask, other=0.0)
            bias = tl.load(bias_rows[:, None] + j[None, :], mask=q_valid[:, None] & key_valid[None, :], other=0.0)
            s = _dot(q, tl.trans(k), IEEE) * scale + bias
            s = tl.where(key_valid[None, :], s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, 1))
            p = tl.exp(s - new_max[:, None])
            correction = tl.exp(row_max - new_max)
            row_sum = row_sum * correction + tl.sum(p, 1)
            acc = acc * correction[:, None] + _dot(p.to(v.dtype), v, IEEE)
            row_max = new_max

        out = (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + pixels[:, None] * dim + head_cols, out, mask=q_mask)
        tl.store(lse_ptr + pixels * num_heads + head, row_max + tl.log(row_sum), mask=q_valid)

    @triton.jit
    def _backward_kernel(
        qkv_ptr, pooled_ptr, index_ptr, bias_ptr, out_ptr, grad_out_ptr, lse_ptr,
        grad_qkv_ptr, grad_pooled_ptr, grad_bias_ptr,
        scale, num_heads, windows_x, map_width, map_tokens, pooled_tokens, num_keys, dim,
        batch, images_per_program, bias_chunk_stride,
        WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        scale = tl.cast(scale, tl.float32)
        window_head = tl.program_id(0)
        key_block = tl.program_id(1)
        chunk = tl.program_id(2)
        window, head = window_head // num_heads, window_head % num_heads
        head_cols, col_valid = _head_columns(head, HEAD_DIM, HEAD_PAD)
        j = key_block * BLOCK_K + tl.arange(0, BLOCK_K)
        key_valid = j < num_keys
        k_mask = key_valid[:, None] & col_valid
        window_pixels, q_valid = _query_pixels(window, windows_x, map_width, WINDOW, BLOCK_Q)
        q_mask = q_valid[:, None] & col_valid
        both = q_valid[:, None] & key_valid[None, :]
        bias_offsets = (window_head * WINDOW * WINDOW + tl.arange(0, BLOCK_Q)[:, None]) * num_keys + j[None, :]
        bias = tl.load(bias_ptr + bias_offsets, mask=both, other=0.0)
        tokens = tl.load(index_ptr + window * num_keys + j, mask=key_valid, other=0)

        grad_bias = tl.zeros([BLOCK_Q, BLOCK_K], tl.float32)
        first = chunk.to(tl.int64) * images_per_program
        for image in range(0, tl.minimum(images_per_program, batch - chunk * images_per_program)):
            b = first + image
            pixels = b * map_tokens + window_pixels
            q = tl.load(qkv_ptr + pixels[:, None] * (3 * dim) + head_cols, mask=q_mask, other=0.0)
            k_rows = _key_rows(qkv_ptr, pooled_ptr, b, tokens, map_tokens, pooled_tokens, dim)[:, None] + head_cols
            k = tl.load(k_rows, mask=k_mask, other=0.0)
            v = tl.load(k_rows + dim, mask=k_mask, other=0.0)
            map_offsets = pixels[:, None] * dim + head_cols
            grad_out = tl.load(grad_out_ptr + map_offsets, mask=q_mask, other=0.0)
            out = tl.load(out_ptr + map_offsets, mask=q_mask, other=0.0)
            delta = tl.sum(grad_out.to(tl.float32) * out.to(tl.float32), 1)  # sum_d dO O, per query
            lse = tl.load(lse_ptr + pixels * num_heads + head, mask=q_valid, other=0.0)

            s = _dot(q, tl.trans(k), IEEE) * scale + bias
            p = tl.where(both, tl.exp(s - lse[:, None]), 0.0)
            grad_v = _dot(tl.trans(p.to(grad_out.dtype)), grad_out, IEEE)
            grad_s = p * (_dot(grad_out, tl.trans(v), IEEE) - delta[:, None])
            grad_bias += grad_s
            grad_k = _dot(tl.trans(grad_s.to(q.dtype)), q, IEEE) * scale
            grad_q = _dot(grad_s.to(k.dtype), k, IEEE) * scale

            grad_k_rows = _key_rows(grad_qkv_ptr, grad_pooled_ptr, b, tokens, map_tokens, pooled_tokens, dim)
            grad_k_rows = grad_k_rows[:, None] + head_cols
            tl.atomic_add(grad_k_rows, grad_k, mask=k_mask, sem="relaxed")
            tl.atomic_add(grad_k_rows + dim, grad_v, mask=k_mask, sem="relaxed")
            grad_q_rows = grad_qkv_ptr + pixels[:, None] * (3 * dim) + head_cols
            tl.atomic_add(grad_q_rows, grad_q, mask=q_mask, sem="relaxed")
        tl.store(grad_bias_ptr + chunk * bias_chunk_stride + bias_offsets, grad_bias, mask=both)


def _block_sizes(window_size: int, head_dim: int) -> dict:
    """Compile-time sizes (queries per window and the head dimension, padded to powers of two >= 16 for
    ``tl.dot``) and the warps per program: 4 for windows up to 8x8 (measured at 7x7), 8 for larger windows
    (fine-tuning at 384 uses 12x12: 256 padded queries per tile)."""
    block_q = max(16, triton.next_power_of_2(window_size * window_size))
    return dict(
        WINDOW=window_size,
        HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_Q=block_q,
        BLOCK_K=BLOCK_K,
        num_warps=4 if block_q <= 64 else 8,
    )


def _geometry(qkv: torch.Tensor, pooled_kv: torch.Tensor, key_index: torch.Tensor, window_size: int) -> dict:
    """The kernels' shape arguments, shared by forward and backward."""
    _, Hp, Wp, C3 = qkv.shape
    return dict(
        windows_x=Wp // window_size,
        map_width=Wp,
        map_tokens=Hp * Wp,
        pooled_tokens=pooled_kv.shape[1],
        num_keys=key_index.shape[1],
        dim=C3 // 3,
    )


def _check_shapes(
    qkv: torch.Tensor,
    pooled_kv: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    window_size: int,
    heads: int,
) -> None:
    """Refuse inputs the kernels would read out of bounds or leave partly unwritten, naming the mismatch."""
    B, Hp, Wp, C3 = qkv.shape
    if Hp % window_size or Wp % window_size:
        raise ValueError(f"fused focal attention needs a map that windows of {window_size} tile, got {Hp}x{Wp}")
    if C3 % (3 * heads) or pooled_kv.shape[0] != B or pooled_kv.shape[2] != 2 * C3 // 3:
        raise ValueError(f"qkv {tuple(qkv.shape)} / pooled k/v {tuple(pooled_kv.shape)} do not fit {heads} heads")
    windows = (Hp // window_size) * (Wp // window_size)
    per_window = (heads, window_size**2, key_index.shape[1])
    if (
        key_index.shape[0] != windows
        or bias.shape not in ((1, *per_window), (windows, *per_window))
        or (mask is not None and mask.shape != (windows, 1, *per_window[1:]))
    ):
        masks = "" if mask is None else f" / mask {tuple(mask.shape)}"
        raise ValueError(
            f"key index {tuple(key_index.shape)} / bias {tuple(bias.shape)}{masks} do not fit {windows} windows of "
            f"{window_size}x{window_size} and {heads} heads"
        )


def _launching_on(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``tensor``'s (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# The kernels as two custom operators with shape-only fake versions: torch.compile treats each as one opaque call (no
# graph break, and Dynamo never traces into Triton's launcher); ``register_autograd`` chains them. The schemas are
# spelled out because torch 2.4 cannot infer them from this module's postponed annotations.


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


@torch.library.custom_op(
    "focal::fused_attention_forward",
    mutates_args=(),
    schema="(Tensor qkv, Tensor pooled_kv, Tensor key_index, Tensor bias, float scale, int window_size, "
    "int num_heads) -> (Tensor, Tensor)",
)
def _attention_forward(
    qkv: torch.Tensor,
    pooled_kv: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    window_size: int,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attended map (B, Hp, Wp, C) in qkv's dtype, and the fp32 log-sum-exp of every query (B, Hp, Wp, nH)."""
    qkv, pooled_kv, key_index, bias = _contiguous(qkv, pooled_kv, key_index, bias)
    B, Hp, Wp, C3 = qkv.shape
    out, lse = _forward_outputs(qkv, pooled_kv, key_index, bias, scale, window_size, num_heads)
    windows = (Hp // window_size) * (Wp // window_size)
    with _launching_on(qkv):
        _forward_kernel[(windows * num_heads, B)](
            qkv, pooled_kv, key_index, bias, out, lse, scale, num_heads,
            **_geometry(qkv, pooled_kv, key_index, window_size),
            **_block_sizes(window_size, C3 // 3 // num_heads), IEEE=qkv.dtype == torch.float32,
        )  # fmt: skip
    return out, lse


@_attention_forward.register_fake
def _forward_outputs(qkv, pooled_kv, key_index, bias, scale, window_size, num_heads):
    """The forward's outputs, unwritten: what tracing sees (the fake version), and what the kernel fills in."""
    B, Hp, Wp, C3 = qkv.shape
    return qkv.new_empty(B, Hp, Wp, C3 // 3), qkv.new_empty(B, Hp, Wp, num_heads, dtype=torch.float32)


@torch.library.custom_op(
    "focal::fused_attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor qkv, Tensor pooled_kv, Tensor key_index, Tensor bias, Tensor out, Tensor lse, "
    "float scale, int window_size, int num_heads) -> (Tensor, Tensor, Tensor)",
)
def _attention_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    pooled_kv: torch.Tensor,
    key_index: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    window_size: int,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of qkv, pooled_kv and bias, in their dtypes, given the forward's inputs and outputs."""
    qkv, pooled_kv, key_index, bias = _contiguous(qkv, pooled_kv, key_index, bias)
    ws, nH = window_size, num_heads
    B, Hp, Wp, C3 = qkv.shape
    geometry = _geometry(qkv, pooled_kv, key_index, ws)
    grad_qkv = torch.zeros(qkv.shape, device=qkv.device, dtype=torch.float32)
    grad_pooled = torch.zeros(pooled_kv.shape, device=qkv.device, dtype=torch.float32)
    windows, key_blocks = (Hp // ws) * (Wp // ws), triton.cdiv(geometry["num_keys"], BLOCK_K)
    chunks = max(1, min(B, triton.cdiv(TARGET_PROGRAMS, windows * nH * key_blocks)))
    images_per_program = max(1, triton.cdiv(B, chunks))
    chunks = max(1, triton.cdiv(B, images_per_program))  # one (empty) chunk for an empty batch
    grad_bias = torch.empty(chunks, *bias.shape, device=qkv.device, dtype=torch.float32)
    with _launching_on(qkv):
        _backward_kernel[(windows * nH, key_blocks, chunks)](
            qkv, pooled_kv, key_index, bias, out, grad_out.contiguous(), lse, grad_qkv, grad_pooled, grad_bias,
            scale, nH, **geometry, batch=B, images_per_program=images_per_program,
            bias_chunk_stride=bias.numel(), **_block_sizes(ws, C3 // 3 // nH), IEEE=qkv.dtype == torch.float32,
        )  # fmt: skip
    return grad_qkv.to(qkv.dtype), grad_pooled.to(pooled_kv.dtype), grad_bias.sum(0).to(bias.dtype)


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, qkv, pooled_kv, key_index, bias, out, lse, scale, window_size, num_heads):
    return qkv.new_empty(qkv.shape), pooled_kv.new_empty(pooled_kv.shape), bias.new_empty(bias.shape)  # contiguous


def _save_for_backward(ctx, inputs, output) -> None:
    qkv, pooled_kv, key_index, bias, scale, window_size, num_heads = inputs
    ctx.save_for_backward(qkv, pooled_kv, key_index, bias, *output)
    ctx.scale, ctx.window_size, ctx.num_heads = scale, window_size, num_heads


def _backward(ctx, grad_out, _grad_lse):
    """The backward operator's gradients, None for the inputs that need none (the integer index, the constants)."""
    grads = _attention_backward(grad_out, *ctx.saved_tensors, ctx.scale, ctx.window_size, ctx.num_heads)
    need_qkv, need_pooled, _, need_bias = ctx.needs_input_grad[:4]
    grad_qkv, grad_pooled, grad_bias = (
        g if need else None for g, need in zip(grads, (need_qkv, need_pooled, need_bias))
    )
    return grad_qkv, grad_pooled, None, grad_bias, None, None, None


_attention_forward.register_autograd(_backward, setup_context=_save_for_backward)


def fused_focal_attention(
    qkv: Tensor, pooled_kv: Tensor, key_index: Tensor, bias: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """``focal_attention.reference_focal_attention`` without dropout, keys read through ``key_index`` by the kernels:
    the same arguments and the same (B, Hp, Wp, C) result in qkv's dtype; see the module docstring. The kernels read
    the bias plus the mask as one (nW, nH, ws*ws, N) tensor, whose gradient autograd sums back onto ``bias``.
    Gradients of gradients are refused (the backward operator has no derivative).
    """
    num_heads, window_size = bias.shape[1], math.isqrt(bias.shape[2])
    _check_shapes(qkv, pooled_kv, key_index, bias, mask, window_size, num_heads)
    bias = full_bias(bias, mask, key_index.shape[0])  # (nW, nH, ws*ws, N)
    out, _ = _attention_forward(qkv, pooled_kv, key_index, bias, scale, window_size, num_heads)
    return out
