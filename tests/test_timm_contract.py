"""timm's model contract for every registered variant (after timm's tests/test_models.py), at tiny sizes.

The pretrained cfg carries our evaluation protocol, models build on any device and dtype, ``forward_intermediates`` /
``prune_intermediate_layers`` / ``features_only`` give the stage outputs, ``group_matcher`` drives layer-wise learning
rate decay, and timm's FX feature extraction traces the models.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.optim import create_optimizer_v2
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import config
import models
from data.transforms import EVAL_CROP_PCT, build_transform
from models import focal_transformer as focal_transformer_module

VARIANTS = list(models.FOCAL_VARIANTS)
V1 = [name for name in VARIANTS if models.FOCAL_VARIANTS[name][0] == "focal"]
V2 = [name for name in VARIANTS if models.FOCAL_VARIANTS[name][0] == "focalv2"]
# One of each kind: v1 patch embedding, v1 conv embedding, v2.
KINDS = ["focal_tiny_patch4_window7_224", "focal_tiny_useconv_patch4_window7_224", V2[0]]

# Stage maps 16/8/4/2 at 64 px; v2 needs stage maps that are multiples of its window (or at most the window).
TINY = dict(img_size=64, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0, num_classes=10)
TINY_V2 = dict(TINY, window_size=4, focal_topK=16)


def tiny_kwargs(name: str) -> dict:
    return dict(TINY_V2 if name in V2 else TINY)


def tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**tiny_kwargs(name), **overrides})


def images(batch: int = 2, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


# ---- pretrained cfg and the evaluation protocol --------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_pretrained_cfg_is_the_evaluation_protocol(name):
    model = tiny(name)
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    defaults = config.get_default_config()  # the protocol main.py --eval follows
    size = defaults.DATA.IMG_SIZE
    expected = {
        "num_classes": defaults.MODEL.NUM_CLASSES,
        "input_size": (3, size, size),
        "pool_size": (size // 32, size // 32),  # the last stage's stride
        "crop_pct": EVAL_CROP_PCT,
        "interpolation": defaults.DATA.INTERPOLATION,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": name in V2,  # v2's top-K key indices are fixed at construction
    }
    assert {key: cfg.get(key) for key in expected} == expected
    state_dict = model.state_dict()
    assert "patch_embed.proj.weight" in state_dict and "head.weight" in state_dict
    assert "url" not in cfg and "hf_hub_id" not in cfg  # nothing to download


def write_jpegs(folder) -> list:
    """JPEGs of ImageNet-like sizes (landscape, portrait, odd sides, larger than 256 and not), smooth and noisy."""
    generator = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate([(500, 375), (375, 500), (333, 499), (640, 427), (257, 300), (1023, 683)]):
        ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        pixels = np.clip(ramp + generator.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def test_timm_data_config_transform_is_bit_identical_to_our_eval_transform(tmp_path):
    """timm's validate.py builds its transform this way; it must feed the model what main.py --eval feeds it."""
    cfg = config.get_default_config()
    config.merge_config_file(cfg, "configs/focal_tiny.yaml")
    ours = build_transform(False, cfg)
    model = timm.create_model("focal_tiny_patch4_window7_224", embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1,) * 4)
    theirs = create_transform(**resolve_data_config(model=model))
    for path in write_jpegs(tmp_path):
        with Image.open(path) as image:
            image = image.convert("RGB")
            expected, actual = ours(image), theirs(image)
        assert actual.shape == (3, 224, 224)
        assert torch.equal(actual, expected), path.name


# ---- construction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_builds_on_the_meta_device_and_runs_there(name):
    model = tiny(name, device="meta")
    placed = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert placed == {"meta"}
    assert model(torch.empty(2, 3, 64, 64, device="meta")).shape == (2, 10)


def test_builds_in_the_dtype_asked_for():
    built = tiny(KINDS[0], dtype=torch.float64)
    cast = tiny(KINDS[0]).double()
    assert {p.dtype for p in built.parameters()} == {torch.float64}
    x = images().double()
    with torch.no_grad():
        assert torch.equal(built.eval()(x), cast.eval()(x))


def test_unknown_constructor_argument_is_a_type_error():
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(KINDS[0], not_a_model_arg=1)


# ---- head, pooling, parameter groups ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_forward_head_pre_logits_is_head_hidden_size_and_global_pool_off_keeps_the_map(name):
    model = tiny(name).eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2, 2, model.num_features)  # (B, h, w, C), output_fmt NHWC
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(pre_logits, features.mean((1, 2)))
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)
        unpooled = tiny(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == features.shape


def test_reset_classifier_keeps_device_dtype_mode_and_pooling():
    model = tiny(KINDS[0]).eval().to(device="meta", dtype=torch.float64)
    model.reset_classifier(3)
    head = model.head
    assert (head.weight.device.type, head.weight.dtype, head.training) == ("meta", torch.float64, False)
    assert model.global_pool == "avg"
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")


def test_group_matcher_orders_parameters_by_depth_for_layer_wise_lr_decay():
    model = tiny(KINDS[0])
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())

    def lr_scale(name: str) -> float:
        return scale[id(named[name])]

    depth_order = [
        "patch_embed.proj.weight",
        "layers.0.blocks.0.attn.qkv.weight",
        "layers.1.blocks.0.attn.qkv.weight",
        "layers.2.blocks.0.attn.qkv.weight",
        "layers.2.blocks.1.attn.qkv.weight",
        "layers.3.blocks.0.attn.qkv.weight",
    ]
    scales = [lr_scale(name) for name in depth_order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales), scales
    # a downsampling and the final norm share the group of the block before them
    assert lr_scale("layers.0.downsample.proj.weight") == lr_scale("layers.0.blocks.0.mlp.fc2.weight") == scales[1]
    assert lr_scale("norm.weight") == scales[-1]
    assert lr_scale("head.weight") == 1.0 and max(scales) < 1.0


# ---- forward_intermediates, pruning, features_only -----------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_intermediates_gives_the_stage_outputs_and_the_final_features(name):
    model = tiny(name).eval()
    x = images()
    stage_outputs = []
    for info in model.feature_info:  # the module each feature_info entry names outputs that stage's features
        model.get_submodule(info["module"]).register_forward_hook(lambda m, i, o: stage_outputs.append(o))
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    assert [tuple(t.shape) for t in intermediates] == [
        (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"]) for info in model.feature_info
    ]
    for tap, hooked in zip(intermediates, stage_outputs):
        assert torch.equal(tap, hooked.permute(0, 3, 1, 2))
    with torch.no_grad():
        nhwc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=2, stop_early=True)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
    assert [torch.equal(a, b.permute(0, 3, 1, 2)) for a, b in zip(intermediates[::3], nhwc)] == [True, True]
    assert [torch.equal(a, b) for a, b in zip(intermediates[2:], early)] == [True, True]
    assert torch.equal(early_final, final)  # indices=2: the last two stages, so nothing stops early
    assert torch.equal(normed[0], final.permute(0, 3, 1, 2))  # the final norm is the last stage's
    with torch.no_grad():
        stopped, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(stopped.permute(0, 3, 1, 2), intermediates[1])  # stopped: stage 1's output, no final norm


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("index", [0, 2])
def test_pruned_model_keeps_the_taps_and_uses_every_parameter(name, index):
    model = tiny(name).eval()
    x = images()
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    kept = model.prune_intermediate_layers([index], prune_norm=True)
    assert kept == [index] and len(model.layers) == index + 1 and model.layers[-1].downsample is None
    assert model.num_features == model.head_hidden_size == model.feature_info[index]["num_chs"]
    with torch.no_grad():
        assert torch.equal(model.forward_intermediates(x, indices=kept, intermediates_only=True)[0], taps[index])
        assert torch.equal(model.forward_features(x).permute(0, 3, 1, 2), taps[index])
    model.train()
    model(x).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", VARIANTS)
def test_features_only_gives_the_stages_of_feature_info(name):
    features = tiny(name, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert features.feature_info.channels() == [8, 16, 32, 64]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(images())
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert all(torch.isfinite(m).all() for m in maps)
    subset = tiny(name, features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [torch.equal(a, b) for a, b in zip(subset(images()), maps[1::2])] == [True, True]


@pytest.mark.parametrize("name", V1)
def test_v1_features_at_odd_input_sizes(name):
    """200x312 gives stride-4 maps of 50x78; each later map halves the previous one (rounding as the stages do)."""
    features = tiny(name, features_only=True).eval()
    with torch.no_grad():
        maps = features(images(1, (200, 312)))
    assert tuple(maps[0].shape[-2:]) == (50, 78)
    for previous, current in zip(maps, maps[1:]):
        assert current.shape[-2] in (previous.shape[-2] // 2, math.ceil(previous.shape[-2] / 2))
        assert current.shape[-1] in (previous.shape[-1] // 2, math.ceil(previous.shape[-1] / 2))
    assert all(torch.isfinite(m).all() for m in maps)


def test_features_only_runs_gradient_checkpointing(monkeypatch):
    """Every block goes through torch.utils.checkpoint once set_grad_checkpointing is on; gradients are unchanged."""
    calls = []
    real_checkpoint = focal_transformer_module.checkpoint
    monkeypatch.setattr(
        focal_transformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    )
    grads = []
    for enable in (False, True):
        features = tiny(KINDS[0], features_only=True)
        features.model.set_grad_checkpointing(enable)
        sum(m.square().mean() for m in features(images())).backward()
        grads.append({n: p.grad for n, p in features.named_parameters() if p.grad is not None})
    assert len(calls) == sum(TINY["depths"])
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# ---- torch.fx ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_fx_feature_extraction_matches_forward_intermediates(name):
    model = tiny(name).eval()
    with torch.no_grad():
        expected = model.forward_intermediates(images(), output_fmt="NHWC", intermediates_only=True)
    features = tiny(name, features_only=True, feature_cls="fx").eval()
    with torch.no_grad():
        maps = features(images())
    assert [torch.equal(a, b) for a, b in zip(maps, expected)] == [True] * 4


@pytest.mark.parametrize("name", KINDS)
def test_fx_traced_model_matches_eager_and_trains(name):
    """As timm's test_model_forward_fx / test_model_backward_fx trace a model: timm's leaf modules and functions."""
    model = tiny(name).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(traced(x).values())), model(x), rtol=1e-5, atol=1e-6)
    traced.train()
    next(iter(traced(x).values())).mean().backward()
    assert [n for n, p in traced.named_parameters() if p.grad is None] == []


def test_fx_traces_an_absolute_position_embedding():
    model = tiny(KINDS[0], ape=True).eval()
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(traced(images()).values())), model(images()))


# ---- attention implementation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KINDS)
def test_reference_attention_gives_the_same_logits(name):
    model = tiny(name).eval()
    with torch.no_grad():
        auto = model(images())
        model.set_attn_impl("reference")
        reference = model(images())
    torch.testing.assert_close(reference, auto, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("flash")
    assert tiny(name, attn_impl="reference").layers[0].blocks[0].attn.attn_impl == "reference"
