"""The fused Triton focal attention (GPU path) computes what the gathered-key attention computes, forward and backward.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (tests/conftest.py); on a GPU they run
compiled. The reference is ``focal_attention.reference_focal_attention`` (``scaled_dot_product_attention`` over
gathered keys), in float64, called with the same arguments.
"""

from __future__ import annotations

import pytest
import torch
from golden import FP32_LOGITS_ATOL, GOLDEN, golden_id, gradient_errors, load_fixture, loaded_model

from models import fused_focal_attention as fused
from models.focal_attention import reference_focal_attention

pytestmark = pytest.mark.skipif(fused.triton is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH, HEADS = 3, 2


def reference(qkv, pooled_kv, key_index, bias, scale, mask=None):
    """The reference attention (float64 here): (B, Hp, Wp, C)."""
    return reference_focal_attention(qkv, pooled_kv, key_index, bias, mask, scale)


def inputs(window_size: int, windows_per_side: int, num_keys: int, head_dim: int, seed: int = 0):
    """A qkv map, pooled k/v ending with the zero slot, a key index into [map tokens, pooled rows] with a repeated
    key and the zero slot, and a bias with -100 entries (masked keys), float64 on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    side = window_size * windows_per_side
    n_windows, n, C = windows_per_side**2, window_size**2, HEADS * head_dim
    qkv = torch.randn(BATCH, side, side, 3 * C, generator=g, dtype=torch.float64)
    pooled_kv = torch.randn(BATCH, 6, 2 * C, generator=g, dtype=torch.float64)
    pooled_kv[:, -1] = 0.0  # the zero slot
    n_tokens = side * side + 5  # the map's tokens and 5 pooled tokens
    key_index = torch.randint(0, n_tokens + 1, (n_windows, num_keys), generator=g)
    key_index[:, -1] = n_tokens  # the zero slot
    key_index[:, 1] = key_index[:, 0]  # a repeated key
    bias = torch.randn(n_windows, HEADS, n, num_keys, generator=g, dtype=torch.float64)
    bias[..., -1] = -100.0
    to = dict(device=DEVICE)
    return qkv.to(**to), pooled_kv.to(**to), key_index.to(**to), bias.to(**to)


# (window size, windows per side, keys per window, head dim): queries not a power of two, keys spanning several
# blocks and ending mid-block, head dims below 16 and not a power of two (padded in the kernels), a window of
# more than 64 queries (8 warps on a GPU).
SHAPES = [(3, 2, 70, 16), (4, 2, 64, 8), (2, 3, 131, 24), (9, 1, 100, 16)]
SHAPE_IDS = [f"ws{s[0]}-nw{s[1] ** 2}-keys{s[2]}-hd{s[3]}" for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_matches_gathered_attention(shape):
    qkv, pooled_kv, key_index, bias = inputs(*shape)
    expected = reference(qkv, pooled_kv, key_index, bias, 0.3)
    out = fused.fused_focal_attention(qkv.float(), pooled_kv.float(), key_index, bias.float(), None, 0.3)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_shared_bias_and_mask_match_the_reference():
    """v1's format: one (1, nH, n, N) bias shared by the windows plus a constant (nW, 1, n, N) mask; the bias gradient
    is summed over the windows."""
    qkv, pooled_kv, key_index, window_bias = inputs(4, 2, 70, 8, seed=3)
    bias = window_bias[:1].clone()  # (1, nH, n, N)
    mask = torch.zeros(key_index.shape[0], 1, 16, 70, dtype=torch.float64, device=DEVICE)
    mask[1::2, ..., 5:9] = -100.0
    outs, grads = [], []
    for attend, dtype in ((reference, torch.float64), (attend_fused, torch.float32)):
        leaf = bias.detach().to(dtype).requires_grad_(True)
        out = attend(qkv.to(dtype), pooled_kv.to(dtype), key_index, leaf, 0.3, mask=mask.to(dtype))
        out.square().sum().backward()
        outs.append(out.double())
        grads.append(leaf.grad.double())
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    assert ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item() < 1e-5


def attend_fused(qkv, pooled_kv, key_index, bias, scale, mask=None):
    return fused.fused_focal_attention(qkv, pooled_kv, key_index, bias, mask, scale)


@pytest.mark.parametrize("target_programs", [1, 10**6], ids=["all-images-per-program", "one-image-per-program"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_backward_matches_autograd(shape, target_programs, monkeypatch):
    monkeypatch.setattr(fused, "TARGET_PROGRAMS", target_programs)
    qkv, pooled_kv, key_index, bias = inputs(*shape, seed=1)
    grad_out = torch.randn(*qkv.shape[:3], qkv.shape[-1] // 3, dtype=torch.float64, device=DEVICE)

    def gradients(attend, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (qkv, pooled_kv, bias)]
        attend(*leaves[:2], key_index, leaves[2], 0.3).backward(grad_out.to(dtype))
        return [leaf.grad.double() for leaf in leaves]

    expected = gradients(reference, torch.float64)
    actual = gradients(attend_fused, torch.float32)
    for name, got, want in zip(("qkv", "pooled k/v", "bias"), actual, expected):
        error = ((got - want).abs().max() / want.abs().max()).item()
        assert error < 1e-5, f"{name} gradient off by {error:.2e}"


# Triton's interpreter mis-reads bfloat16 (float16 goes through the same low-precision casts in the kernels).
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", ["float32", "same"])  # focal-fast's MLP bias is half precision under autocast
def test_half_precision_forward_is_close(dtype, bias_dtype):
    qkv, pooled_kv, key_index, bias = inputs(4, 2, 70, 32, seed=2)
    expected = reference(qkv, pooled_kv, key_index, bias, 0.3)
    bias = bias.float() if bias_dtype == "float32" else bias.to(dtype)
    out = fused.fused_focal_attention(qkv.to(dtype), pooled_kv.to(dtype), key_index, bias, None, 0.3)
    assert out.dtype == dtype
    relative = ((out.double() - expected).norm() / expected.norm()).item()
    assert relative < 1e-2


def test_supports_only_what_the_kernels_take():
    qkv = torch.zeros(1, 4, 4, 3 * 64)
    assert fused.supports(qkv, dropout_p=0.0) and fused.supports(qkv.bfloat16(), dropout_p=0.0)
    assert not fused.supports(qkv, dropout_p=0.1)  # attention dropout: batched path
    assert not fused.supports(qkv.double(), dropout_p=0.0)  # float64: batched path


def test_shapes_the_kernels_cannot_take_are_refused():
    qkv, pooled_kv, key_index, bias = inputs(3, 2, 70, 16)
    window_bias_of_4 = torch.zeros(4, HEADS, 16, 70, device=DEVICE)  # the bias gives the window size: 4x4 here
    with pytest.raises(ValueError, match="windows of 4 tile"):
        fused.fused_focal_attention(qkv.float(), pooled_kv.float(), key_index, window_bias_of_4, None, 0.3)
    with pytest.raises(ValueError, match="do not fit 4 windows"):
        fused.fused_focal_attention(qkv.float(), pooled_kv.float(), key_index[:3], bias.float(), None, 0.3)
    mask = torch.zeros(2, 1, 9, 70, device=DEVICE)  # one window short
    with pytest.raises(ValueError, match=r"mask \(2, 1, 9, 70\) do not fit 4 windows"):
        fused.fused_focal_attention(qkv.float(), pooled_kv.float(), key_index, bias.float(), mask, 0.3)


def test_gradients_of_gradients_are_refused():
    qkv, pooled_kv, key_index, bias = (t.float() if t.is_floating_point() else t for t in inputs(3, 2, 70, 16))
    qkv.requires_grad_(True)
    out = fused.fused_focal_attention(qkv, pooled_kv, key_index, bias, None, 0.3)
    (grad,) = torch.autograd.grad(out.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_deterministic_algorithms_take_the_batched_path(monkeypatch):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not fused.supports(torch.zeros(1, 4, 4, 3 * 64), dropout_p=0.0)


@pytest.mark.parametrize("golden", GOLDEN, ids=golden_id)
def test_golden_fixture_through_the_fused_kernels(golden, monkeypatch):
    """A whole released-layout model (v1 or v2) with its attention in the fused kernels: fp32 logits as close to the
    released ones as the other paths get, and fp32 gradients close to the released fp64 ones."""
    model_class, path = golden
    calls = []
    attend = fused.fused_focal_attention
    monkeypatch.setattr(fused, "fused_focal_attention", lambda *args: calls.append(1) or attend(*args))
    fixture = load_fixture(path)
    model = loaded_model(model_class, fixture, torch.float32, DEVICE).train()
    model.set_attn_impl("fused")
    logits = model(fixture["input"].to(DEVICE))
    assert len(calls) == sum(fixture["kwargs"]["depths"])  # every block attended in the kernels
    error = (logits.detach().cpu() - fixture["logits_fp32"]).abs().max().item()
    assert error < FP32_LOGITS_ATOL[DEVICE], f"{error:.2e}"
    (logits.double() ** 2).mean().backward()
    # fp32 against fp64: measured on CPU up to 2e-5 relative, and 7.5e-9 where the gradient is zero by construction.
    assert gradient_errors(model, fixture["grads_fp64"], rtol=1e-4, zero_atol=1e-6) == {}
