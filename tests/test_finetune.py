"""Fine-tuning loads: checkpoints adapted to another image size, window size or number of classes."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import tiny_focal

from models import CheckpointMismatchError, FocalTransformer
from models.checkpoint_loading import released_derived_buffers
from models.finetune import (
    adapt_checkpoint,
    adapt_state_dict,
    expand_size_of_ring,
    load_pretrained,
    resize_abs_pos_embed,
    resize_grids,
    resize_pool_weight,
    resize_pooled_bias_table,
    resize_ring_bias_table,
    resize_window_bias_table,
    ring_source_index,
)
from models.focal_attention import ring_size


def tiny_model(seed: int = 0, **overrides) -> FocalTransformer:
    """``TINY_FOCAL`` without stochastic depth. Its stage maps are 16/8/4/2 at 64 px (window 4) and 24/12/6/3 at
    96 px (window 6): the same structure, every window-dependent table a different size."""
    return tiny_focal(seed, **{"drop_path_rate": 0.0, **overrides})


def released_layout(model: FocalTransformer) -> dict[str, torch.Tensor]:
    """The model's state dict as a released checkpoint stores it: with the derived index buffers."""
    return {**model.state_dict(), **released_derived_buffers(model)}


def randomise_tables(model: FocalTransformer) -> FocalTransformer:
    """Non-trivial biases and pooling weights, so the resizing is exercised on real values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name or "pool_layers" in name or name == "absolute_pos_embed":
                param.normal_()
    return model


def test_resizing_a_table_to_its_own_size_is_the_identity():
    torch.manual_seed(0)
    window = torch.randn(7 * 7, 3)
    pooled = torch.randn(3, 11 * 11)
    ring = torch.randn(1, 3, 16, ring_size(4, 2))
    assert torch.equal(resize_window_bias_table(window, 49), window)
    assert torch.equal(resize_pooled_bias_table(pooled, 121), pooled)
    assert torch.equal(resize_ring_bias_table(ring, 4, 2), ring)
    for weight in (torch.randn(1, 9), torch.randn(8, 1, 3, 3)):
        assert torch.equal(resize_pool_weight(weight, 3), weight)
    embed = torch.randn(1, 64, 8)
    assert torch.equal(resize_abs_pos_embed(embed, 64), embed)
    # bicubic interpolation at scale 1 is itself exact, even without the short cut
    grids = torch.randn(2, 5, 5)
    interpolated = torch.nn.functional.interpolate(grids[None], size=(5, 5), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(interpolated, resize_grids(grids, 5), rtol=0, atol=1e-6)


def test_resized_tables_have_the_target_shapes():
    assert resize_window_bias_table(torch.randn(49, 3), 121).shape == (121, 3)
    assert resize_pooled_bias_table(torch.randn(3, 81), 169).shape == (3, 169)
    assert resize_ring_bias_table(torch.randn(1, 3, 16, ring_size(4, 2)), 6, 2).shape == (1, 3, 36, ring_size(6, 2))
    assert resize_ring_bias_table(torch.randn(1, 3, 49, ring_size(7, 3)), 7, 2).shape == (1, 3, 49, ring_size(7, 2))
    assert resize_abs_pos_embed(torch.randn(1, 16, 8), 36).shape == (1, 36, 8)


def test_resizing_a_constant_table_keeps_it_constant():
    table = torch.full((1, 2, 16, ring_size(4, 2)), 0.25)
    torch.testing.assert_close(resize_ring_bias_table(table, 6, 3), torch.full((1, 2, 36, ring_size(6, 3)), 0.25))
    torch.testing.assert_close(resize_window_bias_table(torch.full((49, 2), -1.0), 121), torch.full((121, 2), -1.0))


@pytest.mark.parametrize(("old", "new"), [(3, 5), (5, 3), (4, 1), (1, 4)])
def test_pool_weights_keep_their_sum(old, new):
    fc = torch.randn(1, old * old)
    conv = torch.randn(6, 1, old, old)
    torch.testing.assert_close(resize_pool_weight(fc, new).sum(), fc.sum())
    torch.testing.assert_close(resize_pool_weight(conv, new).sum((1, 2, 3)), conv.sum((1, 2, 3)))
    mean_pool = torch.full((1, old * old), 1 / old**2)  # a mean stays a mean
    torch.testing.assert_close(resize_pool_weight(mean_pool, new), torch.full((1, new * new), 1 / new**2))


def test_ring_mapping_is_the_identity_for_the_same_geometry_and_geometric_otherwise():
    assert torch.equal(ring_source_index(7, 3, 7, 3), torch.arange(ring_size(7, 3)))
    assert [expand_size_of_ring(ws, ring_size(ws, e)) for ws, e in [(7, 3), (4, 2), (6, 1), (3, 3)]] == [3, 2, 1, 3]
    # the top-left corner key of a wider window maps to the top-left corner key of the narrower one
    from models.focal_geometry import ring_offsets

    src, dst = ring_offsets(4, 2), ring_offsets(6, 2)
    index = ring_source_index(4, 2, 6, 2)
    assert src[index[dst.index((-2, -2))]] == (-2, -2)
    assert src[index[dst.index((7, 7))]] == (5, 5)


def test_checkpoint_loads_at_another_image_and_window_size_and_fine_tunes():
    source = randomise_tables(tiny_model(ape=True))
    target = tiny_model(seed=1, ape=True, img_size=96, window_size=6)
    reinitialised = load_pretrained(target, released_layout(source))
    assert reinitialised == []
    torch.testing.assert_close(target.patch_embed.proj.weight, source.patch_embed.proj.weight)
    torch.testing.assert_close(target.head.weight, source.head.weight)

    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 96, 96), torch.randint(0, 5, (4,))
    assert torch.isfinite(target(images)).all()
    optimizer = torch.optim.SGD(target.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(target(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_every_window_dependent_tensor_is_resized():
    source = randomise_tables(tiny_model(ape=True))
    target = tiny_model(ape=True, img_size=96, window_size=6)
    adapted = adapt_checkpoint(released_layout(source), target)
    attn = "layers.0.blocks.0.attn."
    for key in (
        "absolute_pos_embed",
        "layers.0.blocks.0.pool_layers.0.weight",
        attn + "relative_position_bias_table",
        attn + "relative_position_bias_table_to_neighbors",
        attn + "relative_position_bias_table_to_windows.0",
    ):
        assert key in adapted.resized
    assert set(adapted.resized) | set(adapted.state_dict) == set(target.state_dict())
    assert all("relative_position_index" not in key for key in adapted.state_dict)
    assert len(adapted.derived) == len(released_derived_buffers(source))


def test_same_shape_load_is_the_identity():
    source = randomise_tables(tiny_model(use_shift=True))
    target = tiny_model(seed=1, use_shift=True)
    adapted = adapt_state_dict(released_layout(source), target)
    assert adapted.keys() == source.state_dict().keys()
    assert all(torch.equal(adapted[k], v) for k, v in source.state_dict().items())
    assert load_pretrained(target, {"model": released_layout(source)}) == []
    images = torch.randn(2, 3, 64, 64)
    source.eval(), target.eval()
    with torch.no_grad():
        assert torch.equal(source(images), target(images))


def test_head_of_another_size_keeps_its_fresh_init(caplog):
    source = tiny_model()
    target = tiny_model(seed=1, num_classes=7)
    fresh_head = {k: v.clone() for k, v in target.head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="models.finetune"):
        reinitialised = load_pretrained(target, source.state_dict())
    assert reinitialised == ["head.bias", "head.weight"]
    assert "re-initialised: head.weight" in caplog.text
    assert all(torch.equal(v, fresh_head[k]) for k, v in target.head.state_dict().items())
    torch.testing.assert_close(target.layers[0].blocks[0].attn.qkv.weight, source.layers[0].blocks[0].attn.qkv.weight)


def test_headless_target_drops_the_head():
    adapted = adapt_checkpoint(tiny_model().state_dict(), tiny_model(num_classes=0))
    assert adapted.dropped == ["head.weight", "head.bias"] and adapted.reinitialised == []


def test_ring_table_absent_at_the_source_size_is_reinitialised():
    # at 32 px stage 1 is a 4x4 map: the window covers it, no ring; at 64 px it is 8x8 with a ring
    source = tiny_model(img_size=32)
    target = tiny_model(seed=1)
    reinitialised = load_pretrained(target, source.state_dict())
    assert "layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors" in reinitialised
    assert all("to_neighbors" in key for key in reinitialised)
    # and the other way round the table has no use and is dropped
    adapted = adapt_checkpoint(target.state_dict(), tiny_model(img_size=32))
    assert "layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors" in adapted.dropped


def test_missing_unexpected_and_unresizable_keys_are_errors():
    source = tiny_model().state_dict()
    target = tiny_model(seed=1)
    incomplete = {k: v for k, v in source.items() if k != "norm.weight"}
    with pytest.raises(CheckpointMismatchError, match="missing keys: norm.weight"):
        load_pretrained(target, incomplete)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: extra.weight"):
        load_pretrained(target, {**source, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="cannot adapt"):
        adapt_state_dict(source, tiny_model(embed_dim=32, num_heads=(1, 2, 2, 4)))
    with pytest.raises(CheckpointMismatchError, match="cannot adapt"):
        adapt_state_dict(source, tiny_model(num_heads=(2, 2, 2, 4)))
