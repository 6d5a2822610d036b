"""Every registered variant builds, runs and trains; full-size variants match the released counts and layout."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from golden import RELEASED, RELEASED_V2, state_dict_manifest

import config
import models
from models import FocalTransformer, FocalTransformerV2, build_model, create_variant, model_kwargs_from_config
from models.checkpoint_loading import released_derived_buffers
from tools.benchmark import BenchSettings
from tools.model_table import COLUMNS, build_row, main, throughput_column, to_markdown

REPO = Path(__file__).resolve().parents[1]
VARIANTS = list(models.FOCAL_VARIANTS)

# Every released variant of both generations -> (parameters, model.flops()) of the released implementation.
RELEASED_ALL = {**RELEASED, **RELEASED_V2}

# Small overrides per model type, on top of head dim 8 and at most 2 blocks per stage (both block parities).
# v1 at 64 px: stage maps 16/8/4/2, i.e. padded windows with a ring, then shrunk windows. v2 does not pad, so its
# stage maps must be multiples of the window.
TINY_BY_TYPE = {
    "focal": dict(img_size=64),
    "focalv2": dict(img_size=64, window_size=4, focal_topK=16),
}
TINY_DEFAULT = dict(img_size=64, window_size=4)
# Types whose blocks accept maps of another size than they were built for (v2's top-K indices are fixed).
RESIZABLE_TYPES = {"focal"}


def tiny_kwargs(name: str) -> dict:
    model_type, args = models.FOCAL_VARIANTS[name]
    return dict(
        TINY_BY_TYPE.get(model_type, TINY_DEFAULT),
        embed_dim=8 * args["num_heads"][0],
        depths=[min(depth, 2) for depth in args["depths"]],
        drop_path_rate=0.0,
        num_classes=10,
    )


def tiny_model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(tiny_kwargs(name), **overrides))


def tiny_eval_output(name: str, batch: int, size: int) -> torch.Tensor:
    """The eval-mode output of the tiny ``name`` (built for 64 px) on a random (batch, 3, size, size) image."""
    model = tiny_model(name).eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


# A small v1 configuration whose windows never shrink at 64 or 96 px, so its parameters do not depend on the
# input size: stage maps 16/8/4 (64 px) or 24/12/6 (96 px) with window 2, shifted odd blocks, two pooled levels.
SIZE_FREE = dict(
    img_size=64,
    embed_dim=8,
    depths=(2, 2, 1),
    num_heads=(1, 2, 2),
    window_size=2,
    expand_sizes=(1, 1, 1),
    focal_levels=(3, 2, 2),
    focal_windows=(3, 3, 1),
    use_shift=True,
    num_classes=5,
    drop_path_rate=0.0,
)


# ---- every registered variant, at a tiny size -----------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_forward_shape(name):
    out = tiny_eval_output(name, 2, 64)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_backward_reaches_every_parameter(name):
    model = tiny_model(name).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    not_finite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    all_zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert not not_finite, f"non-finite gradients: {not_finite}"
    assert not all_zero, f"parameters that do not reach the loss: {all_zero}"


@pytest.mark.parametrize("name", [n for n in VARIANTS if models.FOCAL_VARIANTS[n][0] in RESIZABLE_TYPES])
def test_variant_runs_at_another_input_size(name):
    """Built for 64 px, evaluated at 96 px: each block computes the key layout of the new size."""
    out = tiny_eval_output(name, 1, 96)
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", [n for n in VARIANTS if models.FOCAL_VARIANTS[n][0] not in RESIZABLE_TYPES])
def test_fixed_size_variant_refuses_another_input_size(name):
    model = tiny_model(name).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="24x24"):
        model(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name", VARIANTS)
def test_timm_create_model_refuses_unknown_kwarg(name):
    with pytest.raises(TypeError, match="window_sizes"):
        timm.create_model(name, **tiny_kwargs(name), window_sizes=7)


def test_create_variant_refuses_unknown_kwarg():
    with pytest.raises(TypeError, match="focal_level\\b"):
        create_variant(VARIANTS[0], focal_level=3)


def test_every_variant_is_in_timms_registry():
    assert set(VARIANTS) <= set(timm.list_models("focal*"))
    model = timm.create_model(VARIANTS[0], **tiny_kwargs(VARIANTS[0]))
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("create", [timm.create_model, create_variant], ids=["timm", "create_variant"])
def test_pretrained_true_is_a_clear_error(create):
    with pytest.raises(ValueError, match="load_official_weights"):
        create(VARIANTS[0], pretrained=True)


# ---- full-size released variants (v1 and v2): counts and state_dict layout ---------------------------------------


@contextlib.contextmanager
def skipped_trunc_normal_init() -> Iterator[None]:
    """Skip timm's trunc_normal_ init inside the models package.

    It is most of the build time of a full-size model, and counts, shapes and FLOPs do not depend on it.
    """
    with pytest.MonkeyPatch.context() as patch:
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("models.") and hasattr(module, "trunc_normal_"):
                patch.setattr(module, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
        yield


def full_size(name: str) -> torch.nn.Module:
    with skipped_trunc_normal_init():
        return timm.create_model(name)


@pytest.fixture(scope="module", params=list(RELEASED_ALL))
def full_model(request) -> tuple[str, torch.nn.Module]:
    return request.param, full_size(request.param)


def test_released_variant_is_registered_in_timm_with_its_model_class(full_model):
    name, model = full_model
    assert timm.is_model(name)
    assert type(model) is (FocalTransformerV2 if name in RELEASED_V2 else FocalTransformer)


def test_full_size_parameter_count(full_model):
    name, model = full_model
    assert sum(p.numel() for p in model.parameters()) == RELEASED_ALL[name][0]


def test_full_size_flops(full_model):
    name, model = full_model
    assert model.flops() == RELEASED_ALL[name][1]


def test_full_size_state_dict_matches_released_manifest(full_model):
    """Parameters, persistent buffers and the derived buffers a released checkpoint holds: names, shapes, dtypes."""
    name, model = full_model
    expected = {key: (tuple(shape), kind, dtype) for key, shape, kind, dtype in state_dict_manifest(name)}
    params = dict(model.named_parameters())
    ours = {
        key: (tuple(value.shape), "param" if key in params else "buffer", str(value.dtype).removeprefix("torch."))
        for key, value in {**model.state_dict(), **released_derived_buffers(model)}.items()
    }
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != expected[k]} == {}


def test_full_size_parameter_order_is_released(full_model):
    """Same order as the released named_parameters(), so released optimizer states line up."""
    name, model = full_model
    released = [key for key, _, kind, _ in state_dict_manifest(name) if kind == "param"]
    assert [key for key, _ in model.named_parameters()] == released


@pytest.mark.parametrize("name", list(RELEASED))
def test_config_file_gives_the_registered_variant_arguments(name):
    cfg = config.get_default_config()
    config.merge_config_file(cfg, str(REPO / "configs" / f"{name.removesuffix('_patch4_window7_224')}.yaml"))
    assert cfg.MODEL.NAME == name
    kwargs = model_kwargs_from_config(cfg)
    for key, value in models.FOCAL_VARIANTS[name][1].items():
        assert kwargs[key] == (list(value) if isinstance(value, tuple) else value), key


def test_build_model_from_focal_tiny_config_is_the_registered_variant():
    cfg = config.get_default_config()
    config.merge_config_file(cfg, str(REPO / "configs" / "focal_tiny.yaml"))
    with skipped_trunc_normal_init():
        built = build_model(cfg)
    registered = full_size("focal_tiny_patch4_window7_224")
    assert sum(p.numel() for p in built.parameters()) == RELEASED["focal_tiny_patch4_window7_224"][0]
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in registered.state_dict().items()
    }


def test_focal_tiny_key_counts_per_stage():
    """49 window + 132 released ring slots (120 tokens: the 12 read twice are merged) + fw^2 pooled keys; the last
    7x7 stage: 49 + 1 (no ring)."""
    model = full_size("focal_tiny_patch4_window7_224")
    counts = [[block.key_index.shape[1] for block in stage.blocks] for stage in model.layers]
    assert counts == [[218] * 2, [194] * 2, [178] * 6, [50] * 2]
    model = timm.create_model("focal_tiny_patch4_window7_224", focal_levels=(3, 2, 2, 2), depths=(1, 1, 1, 1))
    assert model.layers[0].blocks[0].key_index.shape[1] == 218 + 64


# ---- released per-block rules -------------------------------------------------------------------------------------


def _blocks(model: FocalTransformer) -> list[list]:
    return [list(stage.blocks) for stage in model.layers]


def test_expand_layer_names_read_backwards():
    """'even' turns the ring off in even-index blocks, 'odd' in odd-index ones (released naming)."""
    base = dict(SMALL, depths=(4, 1, 1, 1))
    for layer, expected in (("all", [3, 3, 3, 3]), ("even", [0, 3, 0, 3]), ("odd", [3, 0, 3, 0])):
        model = FocalTransformer(**base, expand_sizes=(3, 3, 3, 3), expand_layer=layer)
        assert [block.expand_size for block in model.layers[0].blocks] == expected, layer


def test_use_shift_shifts_odd_blocks_by_half_a_window():
    model = FocalTransformer(**dict(SMALL, img_size=112, depths=(3, 1, 1, 1), use_shift=True))
    assert [block.shift_size for block in model.layers[0].blocks] == [0, 3, 0]


def test_window_shrinks_when_it_covers_the_map():
    """Map side <= window: the window becomes the map, ring and shift off; side 8 > 7 is padded instead."""
    model = FocalTransformer(**dict(SMALL, img_size=256, expand_sizes=(3,) * 4))
    stage2, stage3 = model.layers[2].blocks[0], model.layers[3].blocks[0]
    assert (stage2.input_resolution, stage2.window_size, stage2.expand_size) == ((16, 16), 7, 3)
    assert (stage3.input_resolution, stage3.window_size, stage3.expand_size) == ((8, 8), 7, 3)
    assert stage3.key_index.shape[0] == 4  # padded to 14x14: 2x2 windows
    model = FocalTransformer(**dict(SMALL, img_size=224, depths=(1, 1, 1, 2), use_shift=True, focal_levels=(2,) * 4))
    last = model.layers[3].blocks[1]
    assert (last.window_size, last.expand_size, last.shift_size) == (7, 0, 0)
    assert last.attn.relative_position_bias_table.shape == (13 * 13, 1)
    assert last.pool_layers[0].weight.shape == (1, 49)  # fc pooling of the whole 7x7 map


def test_stage_outside_focal_stages_keeps_its_ring_but_no_pooled_level():
    model = FocalTransformer(
        **dict(SMALL, img_size=224, focal_levels=(2,) * 4, focal_stages=(0,), expand_sizes=(3,) * 4)
    )
    assert [stage.blocks[0].key_index.shape[1] for stage in model.layers] == [49 + 120 + 49, 49 + 120, 49 + 120, 49]


def test_focal_level_zero_has_no_ring():
    model = FocalTransformer(**dict(SMALL, img_size=224, focal_levels=(0,) * 4, expand_sizes=(3,) * 4))
    assert all(block.key_index.shape[1] == 49 for stage in _blocks(model) for block in stage)
    assert not [n for n, _ in model.named_parameters() if "to_neighbors" in n or "pool_layers" in n]


# ---- the model interface ----------------------------------------------------------------------------------------


def test_no_weight_decay_names():
    model = FocalTransformer(**dict(SIZE_FREE, ape=True))
    names = [name for name, _ in model.named_parameters()]
    assert model.no_weight_decay() == {"absolute_pos_embed"}
    assert "absolute_pos_embed" in names
    keywords = model.no_weight_decay_keywords()
    tables = [n for n in names if any(word in n for word in keywords)]
    for kind in ("relative_position_bias_table", "_to_neighbors", "_to_windows.0", "_to_windows.1"):
        assert any(kind in n for n in tables), kind
    assert all("relative_position_bias_table" in n for n in tables)


def _output_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_same_output_and_gradients():
    model = FocalTransformer(**SIZE_FREE).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out, grads = _output_and_grads(model, x)
    calls = []
    # a pre-hook: non-reentrant checkpointing stops recomputing once it has what backward needs
    hook = model.layers[0].blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _output_and_grads(model, x)
    hook.remove()
    assert len(calls) == 2  # the block ran again in backward: checkpointing is on
    torch.testing.assert_close(out_ckpt, out, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_set_grad_checkpointing_off_again():
    model = FocalTransformer(**SIZE_FREE, use_checkpoint=True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.layers)


def test_reset_classifier():
    model = FocalTransformer(**SIZE_FREE).eval()
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model(x).shape == (1, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        features = model(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    assert features.shape == (1, model.num_features)
    torch.testing.assert_close(features, pre_logits)


def test_forward_is_features_then_head():
    model = FocalTransformer(**SIZE_FREE).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 4, model.num_features)  # (B, h, w, C)
        torch.testing.assert_close(model.forward_head(features), model(x))


# ---- input sizes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, built_size",
    [
        (SIZE_FREE, 64),
        (dict(SIZE_FREE, window_size=3, use_shift=False), 80),  # maps 20/10/5 padded to 21/12/6 (96 px: none)
    ],
    ids=["shift_window2", "padded_window3"],
)
def test_other_input_size_equals_a_model_built_for_it(kwargs, built_size):
    """The on-the-fly key layout (shift mask, ring, pooled levels, padding) is exactly the one built at construction."""
    torch.manual_seed(0)
    built_small = FocalTransformer(**dict(kwargs, img_size=built_size)).double().eval()
    built_96 = FocalTransformer(**dict(kwargs, img_size=96)).double().eval()
    built_96.load_state_dict(built_small.state_dict())
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(built_small(x), built_96(x), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, built_size, built_size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(built_96(x), built_small(x), rtol=1e-12, atol=1e-12)


def test_layout_cached_for_one_input_size_is_never_used_for_another():
    """Blocks cache the key layout of every other input size they meet: run at a sequence of sizes, revisiting some,
    the model gives at each size what a fresh copy of it (empty caches) gives, bit for bit."""
    model = tiny_model(VARIANTS[0]).eval()
    pristine = copy.deepcopy(model)
    # stage 2 (window 4) pads 96x80 to 8x8 maps and 96x64 to 8x4: sizes that share a height but not a layout
    for height, width in [(96, 80), (96, 64), (80, 96), (96, 80), (96, 64)]:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            assert torch.equal(model(x), copy.deepcopy(pristine)(x)), (height, width)


# ---- construction errors (configurations on which the release crashes) -------------------------------------------

SMALL = dict(img_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(focal_levels=(2, 2, 2, 2), focal_windows=(6, 5, 3, 1)), "focal window must be odd"),
        (dict(window_size=2, expand_sizes=(3, 3, 3, 3)), "expand size 3 is larger than the window 2"),
        (dict(img_size=160, depths=(2, 2, 2, 2), use_shift=True), "multiples of the window"),
        (dict(img_size=112, use_conv_embed=True), "use_conv_embed with img_size 112"),
        (dict(img_size=144, use_conv_embed=True), "use_conv_embed with img_size 144"),
        (dict(expand_layer="none"), "expand_layer"),
        (dict(focal_pool="avg"), "focal_pool"),
        (dict(num_heads=(3, 1, 1, 1)), "num_heads 3 must divide the stage dimension 8"),
    ],
    ids=[
        "even_focal_window",
        "expand_gt_window",
        "shift_160",
        "conv_embed_112",
        "conv_embed_144",
        "expand_layer",
        "focal_pool",
        "num_heads",
    ],
)
def test_release_crashing_configuration_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        FocalTransformer(**dict(SMALL, **overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(focal_levels=(1, 1, 1, 1), focal_windows=(6, 4, 2, 2)),  # even window without pooled levels
        dict(img_size=56, depths=(2, 2, 2, 2), use_shift=True),  # stage maps 14 / 7: multiples of the window
        dict(img_size=128, use_conv_embed=True),  # even intermediate resolutions
        dict(img_size=160, use_shift=True),  # depth 1: no block is shifted, so no Swin mask is built
        dict(window_size=3, expand_sizes=(3, 3, 3, 3)),  # e == ws: diagonal neighbour windows only
        dict(focal_pool="none", focal_levels=(3, 3, 3, 3), focal_windows=(4, 4, 4, 4)),  # no pooled level
    ],
    ids=[
        "even_window_no_pooling",
        "shift_56",
        "conv_embed_128",
        "shift_160_no_shifted_block",
        "expand_eq_window",
        "pool_none",
    ],
)
def test_configuration_the_release_runs_builds_and_runs(overrides):
    model = FocalTransformer(**dict(SMALL, **overrides)).eval()
    size = overrides.get("img_size", 64)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, size, size))).all()


def test_focal_level_zero_ignores_expand_size():
    model = FocalTransformer(**dict(SMALL, window_size=2, focal_levels=(0, 0, 0, 0), expand_sizes=(3, 3, 3, 3)))
    assert all(block.attn.expand_size == 0 for stage in model.layers for block in stage.blocks)


def test_absolute_position_embedding_at_another_input_size_is_clear():
    model = FocalTransformer(**dict(SMALL, ape=True)).eval()
    with pytest.raises(ValueError, match="absolute_pos_embed"), torch.no_grad():
        model(torch.randn(1, 3, 96, 96))


def test_non_square_img_size_is_refused():
    with pytest.raises(ValueError, match="square"):
        FocalTransformer(**dict(SMALL, img_size=(64, 96)))


# ---- tools/model_table.py -------------------------------------------------------------------------------------


def test_model_table_row_of_focal_tiny():
    with skipped_trunc_normal_init():
        row = build_row("focal_tiny_patch4_window7_224")
    assert row["model"] == "focal_tiny_patch4_window7_224"
    assert row["params"] == 28_880_380
    assert row["GFLOPs"] == pytest.approx(4.924284672)
    assert (row["paper params (M)"], row["paper GFLOPs"]) == (28.9, 4.9)
    assert round(row["params (M)"], 1) == row["paper params (M)"]
    assert round(row["GFLOPs"], 1) == row["paper GFLOPs"]
    table = to_markdown([row])
    assert table.splitlines()[0] == "| " + " | ".join(column.header for column in COLUMNS) + " |"
    assert "| focal_tiny_patch4_window7_224 | 28.88 | 28,880,380 | 4.92 | 28.9 | 4.9 |" in table


def test_model_table_cli_writes_markdown_and_json(tmp_path, capsys):
    name = "focal_tiny_patch4_window7_224"
    with skipped_trunc_normal_init():
        main(["--variants", name, "--json", str(tmp_path / "table.json")])
    assert name in capsys.readouterr().out
    rows = json.loads((tmp_path / "table.json").read_text())
    assert [row["model"] for row in rows] == [name]


def test_model_table_refuses_unknown_variant():
    with pytest.raises(SystemExit):
        main(["--variants", "focal_huge"])


def test_model_table_throughput_column_measures_images_per_second():
    settings = BenchSettings(models=[], baseline=[], img_size=[32], mode=["infer"], batch_size=2, iters=1, warmup=0)
    column = throughput_column(settings)
    model = FocalTransformer(**SMALL).eval()
    value = column.value("tiny", model)
    assert value > 0 and "img/s" in column.header
