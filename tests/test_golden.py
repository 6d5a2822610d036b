"""The models reproduce the released implementation's outputs and gradients on every golden fixture."""

from __future__ import annotations

import pytest
import torch
from golden import fixture_paths, load_fixture, max_relative_error

from models import FocalTransformer, load_official_weights

V1_FIXTURES = fixture_paths("golden")


def _loaded_model(fixture: dict, dtype: torch.dtype) -> torch.nn.Module:
    model = FocalTransformer(**fixture["kwargs"])
    load_official_weights(model, fixture["state_dict"])
    return model.to(dtype)


@pytest.fixture(scope="module", params=V1_FIXTURES, ids=lambda p: p.stem)
def fixture(request) -> dict:
    return load_fixture(request.param)


def test_fp64_logits_match_released(fixture):
    model = _loaded_model(fixture, torch.float64).eval()
    with torch.no_grad():
        logits = model(fixture["input"].double())
    assert (logits - fixture["logits_fp64"]).abs().max().item() < 1e-8


def test_fp32_logits_match_released(fixture):
    model = _loaded_model(fixture, torch.float32).eval()
    with torch.no_grad():
        logits = model(fixture["input"])
    assert (logits - fixture["logits_fp32"]).abs().max().item() < 2e-5


def test_fp64_gradients_match_released(fixture):
    model = _loaded_model(fixture, torch.float64).train()
    loss = (model(fixture["input"].double()) ** 2).mean()
    loss.backward()
    grads = dict(model.named_parameters())
    assert fixture["grads_fp64"] and set(fixture["grads_fp64"]) <= set(grads)  # the fixtures keep a subset
    for name, expected in fixture["grads_fp64"].items():
        assert max_relative_error(grads[name].grad, expected) < 1e-8, name
