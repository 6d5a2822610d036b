"""Shared access to the golden fixtures (data produced by the released implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models import FocalTransformer, FocalTransformerV2, load_official_weights

FIXTURES = Path(__file__).parent / "fixtures"

# name -> (parameters, model.flops()) of the released v1 models (the paper's 28.9M / 4.9G etc.).
RELEASED = {
    "focal_tiny_patch4_window7_224": (28_880_380, 4_924_284_672),
    "focal_small_patch4_window7_224": (51_141_940, 9_431_553_792),
    "focal_base_patch4_window7_224": (89_815_400, 16_370_725_888),
    "focal_tiny_useconv_patch4_window7_224": (30_825_244, 5_170_849_536),
    "focal_small_useconv_patch4_window7_224": (53_086_804, 9_678_118_656),
    "focal_base_useconv_patch4_window7_224": (93_268_712, 16_795_816_960),
}
# variant -> (parameters, flops()) of the released v2 implementation (its analytic count; the README says
# 5.0/9.4/16.4 G).
RELEASED_V2 = {
    "focalv2_tiny_useconv_patch4_window7_224": (30_220_564, 5_320_637_440),
    "focalv2_small_useconv_patch4_window7_224": (51_526_540, 9_879_774_208),
    "focalv2_base_useconv_patch4_window7_224": (91_186_824, 17_033_354_496),
}


def fixture_paths(folder: str) -> list[Path]:
    return sorted((FIXTURES / folder).glob("*.pt"))


# Fixture folder -> the model class that must reproduce its fixtures (v1: Focal, v2: Focal-fast).
MODEL_CLASS_OF = {"golden": FocalTransformer, "golden_v2": FocalTransformerV2}
# (model class, fixture path) of every golden fixture.
GOLDEN = [(model_class, path) for folder, model_class in MODEL_CLASS_OF.items() for path in fixture_paths(folder)]


def golden_id(golden: tuple[type[nn.Module], Path]) -> str:
    return f"{golden[1].parent.name}/{golden[1].stem}"


def loaded_model(
    model_class: type[nn.Module], fixture: dict, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """``model_class`` built with the fixture's kwargs, holding its released weights, in ``dtype`` on ``device``."""
    model = model_class(**fixture["kwargs"])
    load_official_weights(model, fixture["state_dict"])
    return model.to(device, dtype)


def load_fixture(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the fixtures' gradient tolerance)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def state_dict_manifest(name: str) -> list[list]:
    """The released state_dict of variant ``name``, in its order: [key, shape, 'param' | 'buffer', dtype] rows."""
    return json.loads((FIXTURES / "state_dict_keys" / f"{name}.json").read_text())["keys"]
