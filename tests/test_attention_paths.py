"""The per-image CPU attention (hand-written backward) against autograd through the batched attention.

The golden tests check the whole model with every input requiring a gradient; here each subset of
(qkv, pooled k/v, bias) requires one, as when parts of a model are frozen, and repeated key rows (the index
scatters gradients back onto shared tokens) are included.
"""

from __future__ import annotations

import pytest
import torch
from attention_reference import gathered_attention

from models import focal_attention as focal_attention_module
from models.focal_attention import attend_per_image

B, MAP, WS, HEADS, HEAD_DIM, KEYS, POOLED = 2, 12, 4, 2, 4, 11, 5
N_WINDOWS, SOURCE_LEN = (MAP // WS) ** 2, MAP * MAP + POOLED


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 qkv (B, Hp, Wp, 3C), pooled k/v (B, L_pooled, 2C), key index (nW, N) into [map tokens, pooled rows] with
    repeats, bias (nW, nH, ws^2, N)."""
    generator = torch.Generator().manual_seed(seed)
    C = HEADS * HEAD_DIM
    qkv = torch.randn(B, MAP, MAP, 3 * C, generator=generator, dtype=torch.float64)
    pooled_kv = torch.randn(B, POOLED, 2 * C, generator=generator, dtype=torch.float64)
    key_index = torch.randint(0, SOURCE_LEN, (N_WINDOWS, KEYS), generator=generator)
    key_index[:, -1] = key_index[:, 0]  # a token read twice by one window
    key_index[:, -2] = SOURCE_LEN - 1  # a pooled row read by every window
    bias = torch.randn(N_WINDOWS, HEADS, WS * WS, KEYS, generator=generator, dtype=torch.float64)
    return qkv, pooled_kv, key_index, bias


def batched_reference(qkv, pooled_kv, key_index, bias, scale, num_heads):
    """The same attention with plain autograd: gather every image's keys, one fused call."""
    return gathered_attention(qkv, pooled_kv, key_index, bias, scale, WS, num_heads)


@pytest.mark.parametrize("windows_per_chunk", [None, 1, 2], ids=["default-chunks", "1-window", "2-windows"])
@pytest.mark.parametrize("trainable", [(0, 1, 3), (0,), (1,), (3,), (1, 3)], ids=str)
def test_per_image_attention_matches_autograd(trainable, windows_per_chunk, monkeypatch):
    """Every image's windows in one chunk, one window per chunk, and 2 per chunk (9 windows: the last chunk shorter)."""
    if windows_per_chunk is not None:
        per_window = focal_attention_module.window_bytes(HEADS, WS * WS, KEYS, HEAD_DIM, 8)
        monkeypatch.setattr(focal_attention_module, "CHUNK_BYTES", windows_per_chunk * per_window)
    scale = HEAD_DIM**-0.5
    grads = []
    for attend in (attend_per_image, batched_reference):
        tensors = list(inputs())
        for position in trainable:
            tensors[position].requires_grad_(True)
        qkv, pooled_kv, key_index, bias = tensors
        out = attend(qkv, pooled_kv, key_index, bias, scale, HEADS)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * weights).sum().backward()
        grads.append((out.detach(), [tensors[position].grad for position in trainable]))
    (out, per_image), (expected_out, expected) = grads
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for actual, wanted in zip(per_image, expected):
        assert actual is not None and wanted.abs().max() > 0
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)


def test_inference_path_matches_training_path():
    qkv, pooled_kv, key_index, bias = inputs()
    with torch.no_grad():
        inference = attend_per_image(qkv, pooled_kv, key_index, bias, 0.5, HEADS)
    training = attend_per_image(qkv.requires_grad_(True), pooled_kv, key_index, bias, 0.5, HEADS)
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)
