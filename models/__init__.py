"""Focal Transformer models, their timm registry entries, config-driven building and checkpoint loading."""

from .build import build_model, model_kwargs_from_config
from .checkpoint_loading import CheckpointMismatchError, check_state_dict, load_official_weights
from .focal_transformer import FocalTransformer
from .focal_transformer_v2 import FocalTransformerV2
from .registry import FOCAL_VARIANTS, create_variant, register_variants

register_variants()

__all__ = [
    "FOCAL_VARIANTS",
    "CheckpointMismatchError",
    "FocalTransformer",
    "FocalTransformerV2",
    "build_model",
    "check_state_dict",
    "create_variant",
    "load_official_weights",
    "model_kwargs_from_config",
]
