"""Named Focal variants, registered in timm's model registry (``timm.create_model(name)`` after ``import models``).

Variants are data: ``FOCAL_VARIANTS`` maps each released name to its constructor arguments; one factory
builds any of them.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from torch import nn

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


def create_variant(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build variant ``name``; ``kwargs`` override its arguments (unknown ones raise TypeError)."""
    if pretrained:
        raise ValueError(
            f"{name}: no weights are downloaded; load a released checkpoint with models.load_official_weights "
            "or main.py --pretrained PATH"
        )
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    model_type, args = FOCAL_VARIANTS[name]
    return MODEL_CLASSES[model_type](**dict(args, **kwargs))


def _register(name: str) -> None:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_variant(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"Released {name} ({FOCAL_VARIANTS[name][0]})."
    register_model(entrypoint)


def register_variants() -> None:
    """Register every variant of ``FOCAL_VARIANTS`` not yet in timm's registry."""
    from timm.models import is_model

    for name in FOCAL_VARIANTS:
        if not is_model(name):
            _register(name)
