"""Checkpoint state dicts: the one unwrapping rule and the one list of derived-buffer names."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from models.checkpoint_loading import RELEASED_BUFFER_NAME, released_derived_buffers, unwrap_state_dict


@pytest.mark.parametrize("name", sorted(models.FOCAL_VARIANTS))
def test_every_released_derived_buffer_is_named_by_the_pattern_and_no_model_key_is(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    derived = released_derived_buffers(model)
    assert derived or name.startswith("focalv2")  # focal-fast's stored buffers are all loaded (and checked)
    assert all(RELEASED_BUFFER_NAME.search(key) for key in derived)
    assert not [key for key in model.state_dict() if RELEASED_BUFFER_NAME.search(key)]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 3},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": {f"module.{key}": value for key, value in sd.items()}},
    ],
    ids=["bare", "ours-or-released", "state_dict", "ddp-prefixed"],
)
def test_unwrap_state_dict_finds_the_weights_in_every_layout(wrap):
    state_dict = {"patch_embed.proj.weight": torch.zeros(1), "head.bias": torch.ones(2)}
    assert unwrap_state_dict(wrap(state_dict)) == state_dict
