"""Named Focal variants, registered in timm's model registry (``timm.create_model(name)`` after ``import models``).

Variants are data: ``FOCAL_VARIANTS`` maps each released name to its constructor arguments, ``default_cfgs`` holds
each one's pretrained cfg (the evaluation protocol: 224 px, resize 256 bicubic and centre crop, ImageNet mean and
std), and one factory, ``_create_focal``, builds any of them through timm's ``build_model_with_cfg``: so
``features_only=True``, ``pretrained=True`` with a local checkpoint file, ``num_classes``, ``device`` / ``dtype``
and ``timm.data.resolve_data_config(model=...)`` work as for timm's own models.

No weights are downloaded: there is no URL in the cfgs. ``pretrained=True`` needs a file,
``pretrained_cfg_overlay=dict(file='focal-tiny-is.pth')``, which is read by our own loader (the released files pickle a
yacs ``CfgNode``, which timm's weights-only loader refuses) and checked strictly (``checkpoint_filter_fn``).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from .checkpoint_loading import checkpoint_filter_fn
from .focal_transformer import FocalTransformer
from .focal_transformer_v2 import FocalTransformerV2

# Shared by every released v1 variant: focal level 2 with fc pooling, focal windows 7/5/3/1, ring 3.
_FOCAL_RECIPE = dict(
    window_size=7,
    focal_pool="fc",
    focal_stages=(0, 1, 2, 3),
    focal_levels=(2, 2, 2, 2),
    focal_windows=(7, 5, 3, 1),
    expand_sizes=(3, 3, 3, 3),
    expand_layer="all",
    use_shift=False,
)
_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}

MODEL_CLASSES: dict[str, type[nn.Module]] = {"focal": FocalTransformer, "focalv2": FocalTransformerV2}

FOCAL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}
for _size, _args in _SIZES.items():
    FOCAL_VARIANTS[f"focal_{_size}_patch4_window7_224"] = ("focal", dict(_FOCAL_RECIPE, **_args))
    FOCAL_VARIANTS[f"focal_{_size}_useconv_patch4_window7_224"] = (
        "focal",
        dict(_FOCAL_RECIPE, **_args, use_conv_embed=True),
    )
for _size, _args in _SIZES.items():  # focal-fast (v2): released only with conv embedding, 128 keys per level
    FOCAL_VARIANTS[f"focalv2_{_size}_useconv_patch4_window7_224"] = (
        "focalv2",
        dict(_FOCAL_RECIPE, **_args, use_conv_embed=True, focal_topK=128),
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """The pretrained cfg of a variant: the released evaluation protocol (``main.py --eval``: resize 224 / 0.875 = 256
    bicubic, centre crop 224, ImageNet mean and std) and the names timm adapts when loading weights."""
    return dict(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="mit",
        paper_ids="arXiv:2107.00641",
        origin_url="https://github.com/microsoft/Focal-Transformer",
        **kwargs,
    )


# v1 runs at any input size (its blocks pad to their windows and build the key layout of the new size); v2's top-K
# key indices are fixed at construction, so a v2 model runs only at the img_size it was built for.
default_cfgs = generate_default_cfgs(
    {name: _cfg(fixed_input_size=model_type == "focalv2") for name, (model_type, _) in FOCAL_VARIANTS.items()}
)


def _construct(
    model_class: type[nn.Module],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``model_class(**kwargs)`` built on ``device`` (default: the current default device) in ``dtype``."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = model_class(**kwargs)
    return model if dtype is None else model.to(dtype=dtype)


def _pretrained_overlay(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that loads the checkpoint file the caller named through our own loader
    (``custom_load``: timm calls the model's ``load_pretrained``). A ValueError when no file or state dict is named."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=overlay)
    if cfg.state_dict is None and not cfg.file:
        raise ValueError(
            f"{name}: no weights are downloaded; name a checkpoint file, "
            f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file='focal-tiny-is.pth')), "
            "or load one into a built model with models.load_official_weights"
        )
    if cfg.state_dict is None:
        overlay["custom_load"] = True
    return overlay


def _create_focal(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build variant ``name`` through timm's ``build_model_with_cfg``; ``kwargs`` override its arguments (unknown ones
    raise TypeError) or are timm's (``features_only``, ``out_indices``, ``pretrained_cfg_overlay``, ``device``, ...)."""
    model_type, args = FOCAL_VARIANTS[name]
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _pretrained_overlay(name, kwargs)
    depths = kwargs.get("depths", args["depths"])
    out_indices = kwargs.pop("out_indices", tuple(range(len(depths))))
    return build_model_with_cfg(
        partial(_construct, MODEL_CLASSES[model_type]),
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(args, **kwargs),
    )


def create_variant(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build variant ``name`` as ``timm.create_model(name, ...)`` does (``kwargs`` override its arguments)."""
    return _create_focal(name, pretrained=pretrained, **kwargs)


def _register(name: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _create_focal(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"Released {name} ({FOCAL_VARIANTS[name][0]})."
    register_model(entrypoint)


def register_variants() -> None:
    """Register every variant of ``FOCAL_VARIANTS`` not yet in timm's registry, with its pretrained cfg."""
    from timm.models import is_model

    for name in FOCAL_VARIANTS:
        if not is_model(name):
            _register(name)
