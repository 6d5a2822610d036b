"""Focal Transformer models, their timm registry entries, config-driven building and checkpoint loading."""

from .backbone import FocalBackbone, create_backbone
from .build import build_model, model_kwargs_from_config
from .checkpoint_loading import (
    CheckpointMismatchError,
    check_state_dict,
    checkpoint_filter_fn,
    load_official_weights,
    load_pretrained_file,
)
from .finetune import adapt_state_dict, load_pretrained
from .focal_transformer import FocalTransformer
from .focal_transformer_v2 import FocalTransformerV2
from .registry import FOCAL_VARIANTS, create_variant, register_variants

register_variants()

__all__ = [
    "FocalBackbone",
    "adapt_state_dict",
    "create_backbone",
    "load_pretrained",
    "FOCAL_VARIANTS",
    "CheckpointMismatchError",
    "FocalTransformer",
    "FocalTransformerV2",
    "build_model",
    "check_state_dict",
    "checkpoint_filter_fn",
    "create_variant",
    "load_official_weights",
    "load_pretrained_file",
    "model_kwargs_from_config",
]
