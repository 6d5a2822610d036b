"""Both model generations reproduce the released implementation's outputs and gradients on every golden fixture."""

from __future__ import annotations

import pytest
import torch
from golden import GOLDEN, golden_id, load_fixture, loaded_model, max_relative_error
from torch import nn

from models import FocalTransformer, FocalTransformerV2

# CPU always; CUDA too where there is a GPU (its batched attention path, with TF32 off so fp32 stays fp32).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]

# Softmax ignores a constant added to a whole row, so with a single focal level the output bias of v2's coord2rpb
# MLP has a zero gradient: both sides hold rounding noise there, compared with the largest gradient (this fraction
# of it). v1 has no such parameter: every one of its gradients is compared relatively.
ZERO_GRADIENT_NOISE = {FocalTransformer: 0.0, FocalTransformerV2: 1e-12}


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="module", params=GOLDEN, ids=golden_id)
def golden(request, device) -> tuple[type[nn.Module], dict]:
    """(model class, fixture) for one golden fixture, its tensors on ``device``."""
    model_class, path = request.param
    fixture = load_fixture(path)
    on_device = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in fixture.items()}
    on_device["grads_fp64"] = {name: grad.to(device) for name, grad in fixture["grads_fp64"].items()}
    return model_class, on_device


def test_fp64_logits_match_released(golden):
    model_class, fixture = golden
    model = loaded_model(model_class, fixture, torch.float64, fixture["input"].device).eval()
    with torch.no_grad():
        logits = model(fixture["input"].double())
    assert (logits - fixture["logits_fp64"]).abs().max().item() < 1e-8


def test_fp32_logits_match_released(golden):
    model_class, fixture = golden
    model = loaded_model(model_class, fixture, torch.float32, fixture["input"].device).eval()
    with torch.no_grad():
        logits = model(fixture["input"])
    assert (logits - fixture["logits_fp32"]).abs().max().item() < 2e-5


def test_fp64_gradients_match_released(golden):
    model_class, fixture = golden
    model = loaded_model(model_class, fixture, torch.float64, fixture["input"].device).train()
    loss = (model(fixture["input"].double()) ** 2).mean()
    loss.backward()
    grads = dict(model.named_parameters())
    expected_grads = fixture["grads_fp64"]
    assert expected_grads and set(expected_grads) <= set(grads)  # the fixtures keep a subset
    rounding = ZERO_GRADIENT_NOISE[model_class] * max(g.abs().max().item() for g in expected_grads.values())
    for name, expected in expected_grads.items():
        actual = grads[name].grad
        if expected.abs().max() < rounding:
            assert actual.abs().max() < rounding, name
        else:
            assert max_relative_error(actual, expected) < 1e-8, name
