"""Focal-fast (v2) against the released implementation: its top-K key choice, checkpoint checks, the released
variants' state_dict layout and configs, and the configurations it refuses. (Golden outputs and gradients:
test_golden.py; the released parameter counts and FLOPs: test_models.py.)"""

from __future__ import annotations

import pytest
import timm
import torch
from golden import FIXTURES, RELEASED_V2, fixture_paths, load_fixture, state_dict_manifest

import config
from models import CheckpointMismatchError, FocalTransformer, FocalTransformerV2, build_model, load_official_weights
from models.focal_transformer_v2 import TopKFocalAttention, index_problem

V2_FIXTURES = fixture_paths("golden_v2")
SHIFTED_FIXTURE = FIXTURES / "golden_v2" / "p04_pool_conv_shift_layerscale_ws4_top24_128.pt"
CONFIG_OF = {name: f"configs/focalv2_{name.split('_')[1]}.yaml" for name in RELEASED_V2}

# Tiny nets for the construction rules (stage resolutions img/4/2^i; each must be a multiple of the window or <= it).
TINY = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), num_classes=5, focal_levels=(2, 2, 2, 2))


@pytest.fixture(scope="module", params=V2_FIXTURES, ids=lambda p: p.stem)
def fixture(request) -> dict:
    return load_fixture(request.param)


def test_own_top_k_is_a_nearest_key_choice(fixture):
    model = FocalTransformerV2(**fixture["kwargs"])
    attentions = [(name, m) for name, m in model.named_modules() if isinstance(m, TopKFocalAttention)]
    assert attentions
    for name, attn in attentions:
        for level in range(attn.focal_level):
            assert index_problem(attn.key_index(level), *attn.level_grid(level)[:2]) is None, (name, level)


# ---- checkpoint checks ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shifted() -> dict:
    return load_fixture(SHIFTED_FIXTURE)


def _tampered(fixture: dict, key: str, change) -> dict:
    state_dict = dict(fixture["state_dict"])
    state_dict[key] = change(state_dict[key].clone())
    return state_dict


def _set(index: tuple, value):
    def change(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return change


@pytest.mark.parametrize(
    "key, change, reason",
    [
        ("layers.0.blocks.0.attn.topk_cloest_indice_0", _set((0, 0), 32 * 32), "indices outside"),
        ("layers.0.blocks.0.attn.topk_cloest_indice_0", _set((0, -1), 32 * 32 - 1), "keys nearest"),
        ("layers.0.blocks.1.attn.topk_cloest_indice_1", _set((3, 1), 3), "same key twice"),
        ("layers.1.blocks.0.attn.topk_cloest_indice_0", lambda t: t.int(), "int64"),
        ("layers.0.blocks.0.attn.topk_cloest_coords_1", _set((5, 2, 1, 0), 0.5), "displacements"),
        ("layers.2.blocks.1.attn.window_coords", lambda t: t.flip(0), "window offsets"),
        ("layers.0.blocks.1.attn_mask", lambda t: t.zero_(), "derived buffers differ"),
    ],
    ids=["out_of_range", "not_nearest", "duplicate", "dtype", "coords", "window_coords", "shift_mask"],
)
def test_loading_refuses_inconsistent_buffers(shifted, key, change, reason):
    model = FocalTransformerV2(**shifted["kwargs"])
    with pytest.raises(CheckpointMismatchError, match=reason) as error:
        load_official_weights(model, _tampered(shifted, key, change))
    assert key in str(error.value)


def test_loading_refuses_another_resolution(shifted):
    model = FocalTransformerV2(**dict(shifted["kwargs"], img_size=64))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_official_weights(model, shifted["state_dict"])


def test_loading_takes_the_released_indices(shifted):
    model = FocalTransformerV2(**shifted["kwargs"])
    for key, value in model.state_dict().items():  # start from indices that differ from the released ones
        if "topk_cloest_indice" in key:
            value.copy_(value.flip(1))
    load_official_weights(model, shifted["state_dict"])
    for key, value in model.state_dict().items():
        if "topk_cloest" in key:
            assert torch.equal(value, shifted["state_dict"][key]), key


# ---- constructor ------------------------------------------------------------------------------------------
def test_released_v2_kwargs_only(fixture):
    FocalTransformerV2(**fixture["kwargs"])
    with pytest.raises(TypeError):
        FocalTransformerV2(**fixture["kwargs"], focal_topk=8)
    with pytest.raises(TypeError):
        FocalTransformer(**fixture["kwargs"])  # focal_topK is v2's


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=112, window_size=7),
        dict(img_size=64, window_size=4, use_shift=True, depths=(2, 2, 2, 1), focal_topK=16, focal_pool="max"),
        dict(img_size=80, window_size=5, focal_topK=8, focal_pool="mean", focal_levels=(3, 3, 3, 3)),
        dict(img_size=96, window_size=3, focal_topK=12, focal_pool="conv", use_layerscale=True),
        dict(img_size=96, window_size=6, focal_levels=(1, 1, 1, 1), focal_pool="none", ape=True),
        dict(img_size=128, window_size=8, focal_topK=16, focal_stages=(), focal_levels=(1, 1, 1, 1)),
    ],
    ids=["ws7_112", "ws4_64_shift", "ws5_80_levels3", "ws3_96_conv", "ws6_96_levels1", "ws8_128_no_focal_stage"],
)
def test_fresh_model_trains(kwargs):
    model = FocalTransformerV2(**dict(TINY, **kwargs))
    image = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    model(image).square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(img_size=168, window_size=7), "does not pad"),
        (dict(img_size=196, window_size=7), "does not pad"),
        (dict(img_size=96, window_size=4), "does not pad"),
        (dict(img_size=112, window_size=7, use_conv_embed=True), "intermediate resolutions must be even"),
        (dict(img_size=112, window_size=7, focal_levels=(0, 1, 1, 1)), "focal_level >= 1"),
        (dict(img_size=112, window_size=7, focal_pool="none"), "needs pooled maps"),
        (dict(img_size=112, window_size=7, focal_stages=(0, 1, 2)), "needs pooled maps"),
        (dict(img_size=112, window_size=7, focal_topK=0), "focal_topK"),
        (dict(img_size=112, window_size=7, num_heads=(3, 2, 2, 4)), "must divide"),
    ],
    ids=["ws7_168", "ws7_196", "ws4_96", "conv_embed_odd", "level0", "pool_none", "stage_not_focal", "topk0", "heads"],
)
def test_configurations_the_release_cannot_run_are_refused(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        FocalTransformerV2(**dict(TINY, **kwargs))


def test_other_input_size_is_refused():
    model = FocalTransformerV2(**dict(TINY, img_size=64, window_size=4))
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 128, 128))


# ---- released variants ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RELEASED_V2))
def test_variant_state_dict_layout(name):
    model = timm.create_model(name)
    buffers = {key for key, _ in model.named_buffers()}
    ours = [
        [key, list(value.shape), "buffer" if key in buffers else "param", str(value.dtype).removeprefix("torch.")]
        for key, value in model.state_dict().items()
    ]
    assert ours == state_dict_manifest(name)


@pytest.mark.parametrize("name", list(RELEASED_V2))
def test_config_builds_the_variant(name):
    cfg = config.get_default_config()
    config.merge_config_file(cfg, CONFIG_OF[name])
    model = build_model(cfg)
    assert isinstance(model, FocalTransformerV2)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_V2[name][0]
    assert model.flops() == RELEASED_V2[name][1]
