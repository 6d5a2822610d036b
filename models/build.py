"""The one place where a YACS config becomes model constructor arguments."""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import MODEL_CLASSES


def model_kwargs_from_config(config) -> dict[str, Any]:
    """Constructor keyword arguments of the released Focal models, read from ``config``."""
    focal = config.MODEL.FOCAL
    kwargs = dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=focal.PATCH_SIZE,
        in_chans=focal.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=focal.EMBED_DIM,
        depths=list(focal.DEPTHS),
        num_heads=list(focal.NUM_HEADS),
        window_size=focal.WINDOW_SIZE,
        mlp_ratio=focal.MLP_RATIO,
        qkv_bias=focal.QKV_BIAS,
        qk_scale=focal.QK_SCALE or None,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=focal.APE,
        patch_norm=focal.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        use_shift=focal.USE_SHIFT,
        focal_stages=list(focal.FOCAL_STAGES),
        focal_levels=list(focal.FOCAL_LEVELS),
        focal_windows=list(focal.FOCAL_WINDOWS),
        focal_pool=focal.FOCAL_POOL,
        expand_stages=list(focal.EXPAND_STAGES),
        expand_sizes=list(focal.EXPAND_SIZES),
        expand_layer=focal.EXPAND_LAYER,
        use_conv_embed=focal.USE_CONV_EMBED,
        use_layerscale=focal.USE_LAYERSCALE,
        layerscale_value=focal.LAYERSCALE_VALUE,
        use_pre_norm=focal.USE_PRE_NORM,
    )
    if config.MODEL.TYPE == "focalv2":
        kwargs["focal_topK"] = focal.FOCAL_TOPK
    return kwargs


def build_model(config) -> nn.Module:
    """Build the model that ``config.MODEL.TYPE`` names with the config's architecture."""
    if config.MODEL.TYPE not in MODEL_CLASSES:
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; known: {sorted(MODEL_CLASSES)}")
    for key in ("DEPTHS", "NUM_HEADS", "FOCAL_LEVELS", "FOCAL_WINDOWS", "EXPAND_SIZES"):
        if len(config.MODEL.FOCAL[key]) != len(config.MODEL.FOCAL.DEPTHS):
            raise ValueError(
                f"MODEL.FOCAL.{key} has {len(config.MODEL.FOCAL[key])} entries but DEPTHS has "
                f"{len(config.MODEL.FOCAL.DEPTHS)} stages"
            )
    return MODEL_CLASSES[config.MODEL.TYPE](**model_kwargs_from_config(config))
