"""Both model generations reproduce the released implementation's outputs and gradients on every golden fixture."""

from __future__ import annotations

import pytest
import torch
from golden import (
    FP32_LOGITS_ATOL,
    FP64_GRAD_RTOL,
    FP64_LOGITS_ATOL,
    FP64_ZERO_GRAD_ATOL,
    GOLDEN,
    golden_id,
    gradient_errors,
    load_fixture,
    loaded_model,
)
from torch import nn

# CPU always; CUDA too where there is a GPU (its batched attention path, with TF32 off so fp32 stays fp32).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


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
    error = (logits - fixture["logits_fp64"]).abs().max().item()
    assert error < FP64_LOGITS_ATOL, f"{error:.2e}"


def test_fp32_logits_match_released(golden):
    model_class, fixture = golden
    device = fixture["input"].device
    model = loaded_model(model_class, fixture, torch.float32, device).eval()
    with torch.no_grad():
        logits = model(fixture["input"])
    error = (logits - fixture["logits_fp32"]).abs().max().item()
    assert error < FP32_LOGITS_ATOL[device.type], f"{error:.2e}"


def test_fp64_gradients_match_released(golden):
    model_class, fixture = golden
    model = loaded_model(model_class, fixture, torch.float64, fixture["input"].device).train()
    loss = (model(fixture["input"].double()) ** 2).mean()
    loss.backward()
    expected_grads = fixture["grads_fp64"]
    assert expected_grads and set(expected_grads) <= {name for name, _ in model.named_parameters()}  # a subset
    assert gradient_errors(model, expected_grads, FP64_GRAD_RTOL, FP64_ZERO_GRAD_ATOL) == {}
