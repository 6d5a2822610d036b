"""The chunked CPU attention (hand-written backward) against autograd through the reference attention, and the choice
of implementation (``attn_impl``).

The golden tests check the whole model with every input requiring a gradient; here each subset of
(qkv, pooled k/v, bias) requires one, as when parts of a model are frozen, and repeated key rows (the index
scatters gradients back onto shared tokens) are included. The bias comes both ways the models give it: one per
window (v2), and one shared by the windows plus a constant per-window mask (v1).
"""

from __future__ import annotations

import pytest
import torch

from models import cpu_focal_attention, fused_focal_attention
from models.cpu_focal_attention import chunked_focal_attention
from models.focal_attention import attention_path, reference_focal_attention
from models.focal_transformer import FocalBlock, cached_key_layout

B, MAP, WS, HEADS, HEAD_DIM, KEYS, POOLED = 2, 12, 4, 2, 4, 11, 5
N_WINDOWS, SOURCE_LEN = (MAP // WS) ** 2, MAP * MAP + POOLED


def inputs(
    seed: int = 0, shared_bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp64 qkv (B, Hp, Wp, 3C), pooled k/v (B, L_pooled, 2C), key index (nW, N) into [map tokens, pooled rows] with
    repeats, and either bias (nW, nH, ws^2, N) and no mask or bias (1, nH, ws^2, N) and a -100 / 0 mask
    (nW, 1, ws^2, N)."""
    generator = torch.Generator().manual_seed(seed)
    C = HEADS * HEAD_DIM
    qkv = torch.randn(B, MAP, MAP, 3 * C, generator=generator, dtype=torch.float64)
    pooled_kv = torch.randn(B, POOLED, 2 * C, generator=generator, dtype=torch.float64)
    key_index = torch.randint(0, SOURCE_LEN, (N_WINDOWS, KEYS), generator=generator)
    key_index[:, -1] = key_index[:, 0]  # a token read twice by one window
    key_index[:, -2] = SOURCE_LEN - 1  # a pooled row read by every window
    n_bias_windows = 1 if shared_bias else N_WINDOWS
    bias = torch.randn(n_bias_windows, HEADS, WS * WS, KEYS, generator=generator, dtype=torch.float64)
    mask = None
    if shared_bias:
        masked = torch.rand(N_WINDOWS, 1, WS * WS, KEYS, generator=generator) < 0.2
        mask = torch.zeros(masked.shape, dtype=torch.float64).masked_fill(masked, -100.0)
    return qkv, pooled_kv, key_index, bias, mask


@pytest.mark.parametrize("shared_bias", [False, True], ids=["window-bias", "shared-bias-and-mask"])
@pytest.mark.parametrize("windows_per_chunk", [None, 1, 2], ids=["default-chunks", "1-window", "2-windows"])
@pytest.mark.parametrize("trainable", [(0, 1, 3), (0,), (1,), (3,), (1, 3)], ids=str)
def test_chunked_attention_matches_the_reference(trainable, windows_per_chunk, shared_bias, monkeypatch):
    """Every image's windows in one chunk, one window per chunk, and 2 per chunk (9 windows: the last chunk shorter)."""
    if windows_per_chunk is not None:
        per_window = cpu_focal_attention.window_bytes(HEADS, WS * WS, KEYS, HEAD_DIM, 8)
        monkeypatch.setattr(cpu_focal_attention, "CHUNK_BYTES", windows_per_chunk * per_window)
    scale = HEAD_DIM**-0.5
    grads = []
    for attend in (chunked_focal_attention, reference_focal_attention):
        tensors = list(inputs(shared_bias=shared_bias))
        for position in trainable:
            tensors[position].requires_grad_(True)
        qkv, pooled_kv, key_index, bias, mask = tensors
        out = attend(qkv, pooled_kv, key_index, bias, mask, scale)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * weights).sum().backward()
        grads.append((out.detach(), [tensors[position].grad for position in trainable]))
    (out, chunked), (expected_out, expected) = grads
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for actual, wanted in zip(chunked, expected):
        assert actual is not None and wanted.abs().max() > 0
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)


def test_inference_path_matches_training_path():
    qkv, pooled_kv, key_index, bias, mask = inputs(shared_bias=True)
    with torch.no_grad():
        inference = chunked_focal_attention(qkv, pooled_kv, key_index, bias, mask, 0.5)
    training = chunked_focal_attention(qkv.requires_grad_(True), pooled_kv, key_index, bias, mask, 0.5)
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("attn_impl", "dropout_p", "dtype", "path"),
    [
        ("auto", 0.0, torch.float32, "chunked"),
        ("auto", 0.0, torch.float64, "chunked"),
        ("auto", 0.1, torch.float32, "reference"),  # attention dropout: only the reference has it
        ("reference", 0.0, torch.float32, "reference"),
        ("chunked", 0.0, torch.float32, "chunked"),
        pytest.param(  # asked for: on CPU tensors through Triton's interpreter
            "fused",
            0.0,
            torch.float32,
            "fused",
            marks=pytest.mark.skipif(fused_focal_attention.triton is None, reason="no triton"),
        ),
    ],
)
def test_attention_path_on_cpu(attn_impl, dropout_p, dtype, path):
    assert attention_path(torch.zeros(1, 4, 4, 24, dtype=dtype), dropout_p, attn_impl) == path


@pytest.mark.parametrize(
    ("attn_impl", "dropout_p", "dtype", "message"),
    [
        ("flash", 0.0, torch.float32, "attn_impl must be one of"),
        ("fused", 0.1, torch.float32, "attn_impl='fused' needs"),
        ("fused", 0.0, torch.float64, "attn_impl='fused' needs"),
        ("chunked", 0.1, torch.float32, "attn_impl='chunked' has no attention dropout"),
    ],
)
def test_an_implementation_that_cannot_run_the_call_is_refused(attn_impl, dropout_p, dtype, message):
    with pytest.raises(ValueError, match=message):
        attention_path(torch.zeros(1, 4, 4, 24, dtype=dtype), dropout_p, attn_impl)


def test_another_input_size_leaves_nothing_on_the_block():
    """A v1 block attends a map of another size than its resolution through the shared, bounded CPU layout cache: the
    block gains no state that ``.to()`` and ``state_dict`` would not see, and the result is that of a block built
    for that size."""
    torch.manual_seed(0)
    native = FocalBlock(16, (8, 8), 2, 4, 1, 2, 2, 3, "fc").eval()
    other = FocalBlock(16, (12, 12), 2, 4, 1, 2, 2, 3, "fc").eval()
    other.load_state_dict(native.state_dict())
    attributes = set(vars(native))
    x = torch.randn(2, 12, 12, 16)
    with torch.no_grad():
        out = native(x)
        torch.testing.assert_close(native(x), out, rtol=0, atol=0)
        torch.testing.assert_close(out, other(x), rtol=0, atol=0)
    assert set(vars(native)) == attributes
    assert cached_key_layout.cache_info().maxsize is not None
