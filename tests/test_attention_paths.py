"""The per-image CPU attention (hand-written backward) against autograd through the batched attention.

The golden tests check the whole model with every input requiring a gradient; here each subset of
(q, key source, bias) requires one, as when parts of a model are frozen, and repeated key rows (the index
scatters gradients back onto shared tokens) are included.
"""

from __future__ import annotations

import pytest
import torch

from models.focal_attention import (
    attend_per_image,
    focal_attention,
    gather_keys_values,
    key_value_rows,
    window_heads_to_map,
)

B, MAP, WS, HEADS, HEAD_DIM, KEYS = 2, 8, 4, 2, 4, 11
N_WINDOWS, SOURCE_LEN = (MAP // WS) ** 2, MAP * MAP + 5


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 q (B, nW, nH, ws^2, hd), key source (B, L, 2C), key index (nW, N) with repeats, bias (nW, nH, ws^2, N)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N_WINDOWS, HEADS, WS * WS, HEAD_DIM, generator=generator, dtype=torch.float64)
    kv_source = torch.randn(B, SOURCE_LEN, 2 * HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    key_index = torch.randint(0, SOURCE_LEN, (N_WINDOWS, KEYS), generator=generator)
    key_index[:, -1] = key_index[:, 0]  # a token read twice by one window
    bias = torch.randn(N_WINDOWS, HEADS, WS * WS, KEYS, generator=generator, dtype=torch.float64)
    return q, kv_source, key_index, bias


def batched_reference(q, kv_source, key_index, bias, scale, map_size):
    """The same attention with plain autograd: gather every image's keys, one fused call."""
    k, v = gather_keys_values(kv_source, key_value_rows(key_index, HEADS)).flatten(2, 3).unbind(1)
    out = focal_attention(q.flatten(1, 2), k, v, bias.flatten(0, 1)[None], scale, 0.0)
    return window_heads_to_map(out.unflatten(1, (N_WINDOWS, HEADS)), map_size)


@pytest.mark.parametrize("trainable", [(0, 1, 3), (0,), (1,), (3,), (1, 3)], ids=str)
def test_per_image_attention_matches_autograd(trainable):
    scale = HEAD_DIM**-0.5
    grads = []
    for attend in (attend_per_image, batched_reference):
        tensors = list(inputs())
        for position in trainable:
            tensors[position].requires_grad_(True)
        q, kv_source, key_index, bias = tensors
        out = attend(q, kv_source, key_index, bias, scale, (MAP, MAP))
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        (out * weights).sum().backward()
        grads.append((out.detach(), [tensors[position].grad for position in trainable]))
    (out, per_image), (expected_out, expected) = grads
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for actual, wanted in zip(per_image, expected):
        assert actual is not None and wanted.abs().max() > 0
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)


def test_inference_path_matches_training_path():
    q, kv_source, key_index, bias = inputs()
    with torch.no_grad():
        inference = attend_per_image(q, kv_source, key_index, bias, 0.5, (MAP, MAP))
    training = attend_per_image(q.requires_grad_(True), kv_source, key_index, bias, 0.5, (MAP, MAP))
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)
