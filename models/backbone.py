"""Focal Transformer as a dense-prediction backbone (detection / segmentation).

``FocalBackbone`` takes the stem and stages of an existing ``FocalTransformer`` and returns one NCHW map per
requested stage, each normalised by its own LayerNorm ``norm{i}`` as the released Swin/Focal detection backbones do.
It is a thin layer over the model's ``forward_intermediates`` (``FocalTrunk``, which it shares with the classifier):
the image is zero-padded right/bottom to a multiple of the deepest stride that is run (every stage then halves an
even map), ``forward_intermediates`` runs the stages up to the last requested one (the blocks build their key layout
for the new map sizes on the fly, an absolute position embedding is resized), and each output is cropped back to
``ceil(H / stride)`` and normalised. ``FocalBackboneWithFPN`` adds a torchvision ``FeaturePyramidNetwork`` and exposes
``out_channels``, which is what torchvision's detection models (RetinaNet, Faster/Mask R-CNN) expect of a backbone.

A block whose constructed resolution made it shrink its window (one window covered the whole map, so no
ring and no shift; at 224 px this is stage 3 of the released models) keeps that window at every input
size: on a larger map it is an ordinary window of that size without a ring, padded like any other.

The state_dict keys of ``FocalBackbone`` are those of the classification model (``patch_embed.*``,
``layers.*``, ``absolute_pos_embed``) plus ``norm{i}.*``, the layout of the released detection backbones;
the classifier's final ``norm`` and ``head`` are not part of it.

timm's own feature extraction, ``timm.create_model(name, features_only=True)``, runs the same
``forward_intermediates`` without padding, cropping or per-stage norms.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .focal_attention import FocalWindowAttention
from .focal_transformer import FocalTransformer, FocalTrunk, resize_pos_embed
from .registry import FOCAL_VARIANTS, create_variant


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) images right/bottom so H and W are multiples of ``multiple``."""
    H, W = images.shape[-2:]
    return F.pad(images, (0, -W % multiple, 0, -H % multiple))


class FocalBackbone(FocalTrunk):
    """Multi-scale NCHW features of a ``FocalTransformer``: images (B, 3, H, W) of any size -> list of maps.

    Output ``j`` is stage ``out_indices[j]`` before its downsampling, normalised by ``norm{i}``, with shape
    (B, out_channels[j], ceil(H / strides[j]), ceil(W / strides[j])). Stages after the last requested one
    are not kept; the downsampling of the last kept stage is kept (so a full checkpoint loads) but never
    run, and its parameters are frozen so DDP does not report them as unused.
    """

    def __init__(self, model: FocalTransformer, out_indices: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        if not all(isinstance(block.attn, FocalWindowAttention) for stage in model.layers for block in stage.blocks):
            raise TypeError(
                f"FocalBackbone needs v1 focal blocks, which run at any input size; {type(model).__name__} has "
                "blocks fixed to their constructed resolution"
            )
        num_stages = len(model.layers)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not 0 <= out_indices[0]:
            raise ValueError(f"out_indices must be distinct increasing stage indices, got {out_indices}")
        if out_indices[-1] >= num_stages:
            raise ValueError(f"out_indices {out_indices} name a stage beyond the model's {num_stages} stages")
        last = out_indices[-1]

        self.out_indices = out_indices
        self.patch_embed = model.patch_embed
        self.ape = model.ape
        self.dynamic_img_size = True  # any input size: the position embedding is resized to the token map
        if self.ape:
            self.absolute_pos_embed = model.absolute_pos_embed
        self.pos_drop = model.pos_drop
        self.layers = nn.ModuleList(model.layers[: last + 1])
        if self.layers[last].downsample is not None:
            self.layers[last].downsample.requires_grad_(False)
        self.norm = nn.Identity()  # the classifier's final norm is not part of the backbone (norm{i} are its own)
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(model.feature_info[i]["num_chs"]))

        self.feature_info = [dict(model.feature_info[i]) for i in out_indices]
        self.out_channels = [info["num_chs"] for info in self.feature_info]
        self.strides = [info["reduction"] for info in self.feature_info]
        self.size_divisor = model.feature_info[last]["reduction"]  # every run stage then gets an exact halving

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        H, W = images.shape[-2:]
        maps = self.forward_intermediates(
            pad_to_multiple(images, self.size_divisor),
            indices=self.out_indices,
            stop_early=True,
            output_fmt="NHWC",
            intermediates_only=True,
        )  # (B, h_i, w_i, C_i) each
        features = []
        for i, x, stride in zip(self.out_indices, maps, self.strides):
            out = getattr(self, f"norm{i}")(x[:, : math.ceil(H / stride), : math.ceil(W / stride)])
            features.append(out.permute(0, 3, 1, 2).contiguous())  # (B, C_i, ceil(H/s), ceil(W/s))
        return features


def create_backbone(
    name_or_model: str | FocalTransformer, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs: Any
) -> FocalBackbone:
    """A ``FocalBackbone`` of a registered variant or of a built model.

    With a name, ``kwargs`` are those of ``timm.create_model`` (architecture overrides, ``pretrained=True`` with
    ``pretrained_cfg_overlay=dict(file=...)`` to start from a classification checkpoint).
    """
    if isinstance(name_or_model, str):
        if name_or_model not in FOCAL_VARIANTS:
            raise ValueError(f"unknown Focal variant {name_or_model!r}; known: {sorted(FOCAL_VARIANTS)}")
        model = create_variant(name_or_model, **kwargs)
    else:
        if kwargs:
            raise TypeError(f"model arguments {sorted(kwargs)} given with an already built model")
        model = name_or_model
    if not isinstance(model, FocalTransformer):
        raise TypeError(f"FocalBackbone needs a FocalTransformer, got {type(model).__name__}")
    return FocalBackbone(model, out_indices=out_indices)


class FocalBackboneWithFPN(nn.Module):
    """``FocalBackbone`` + torchvision ``FeaturePyramidNetwork``: images -> OrderedDict of NCHW maps.

    Keys are "0", "1", ... per backbone output, then those of ``extra_blocks`` (default: torchvision's
    ``LastLevelMaxPool``, key "pool"). ``out_channels`` is the FPN width, as torchvision detectors expect.
    """

    def __init__(
        self,
        backbone: FocalBackbone,
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            backbone.out_channels,
            out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(images)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


__all__ = ["FocalBackbone", "FocalBackboneWithFPN", "create_backbone", "pad_to_multiple", "resize_pos_embed"]
