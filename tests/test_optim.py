"""Optimizer construction: weight-decay groups, optimizer choice, learning-rate scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from config import get_default_config
from optim import build_optimizer, param_groups_weight_decay, scale_learning_rates
from utils.errors import ConfigError


class TinyModel(nn.Module):
    """A model with the timm-style weight-decay hooks and one parameter of each kind."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.attn_relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}


def _names_by_decay(model: nn.Module, groups: list[dict]) -> dict[float, set[str]]:
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {group["weight_decay"]: {name_of[id(p)] for p in group["params"]} for group in groups}


def _config(**overrides):
    """The default config with ``{"SECTION.KEY": value}`` overrides applied."""
    config = get_default_config()
    config.defrost()
    for key, value in overrides.items():
        node, _, leaf = key.rpartition(".")
        target = config
        for part in filter(None, node.split(".")):
            target = target[part]
        target[leaf] = value
    return config


def test_weight_decay_skips_norms_biases_and_model_listed_names():
    model = TinyModel()
    groups = _names_by_decay(model, param_groups_weight_decay(model, 0.05))
    assert groups[0.05] == {"proj.weight", "head.weight"}
    assert groups[0.0] == {
        "pos_embed",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "attn_relative_position_bias_table",
        "head.bias",
    }


def test_weight_decay_groups_work_without_model_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    groups = _names_by_decay(model, param_groups_weight_decay(model, 0.1))
    assert groups == {0.1: {"0.weight"}, 0.0: {"0.bias", "1.weight", "1.bias"}}


def test_adamw_uses_config_hyperparameters():
    """Every value differs from both the config default and torch's, so each must come from the config."""
    config = _config(
        **{
            "TRAIN.BASE_LR": 1e-3,
            "TRAIN.WEIGHT_DECAY": 0.07,
            "TRAIN.OPTIMIZER.EPS": 1e-6,
            "TRAIN.OPTIMIZER.BETAS": (0.8, 0.95),
        }
    )
    optimizer = build_optimizer(config, TinyModel())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 1e-3
    assert optimizer.defaults["eps"] == 1e-6
    assert optimizer.defaults["betas"] == (0.8, 0.95)
    assert not optimizer.defaults["fused"]  # CPU parameters: the fused kernel is CUDA-only
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.07]


def test_sgd_uses_nesterov_momentum():
    config = _config(**{"TRAIN.OPTIMIZER.NAME": "sgd", "TRAIN.OPTIMIZER.MOMENTUM": 0.8})
    optimizer = build_optimizer(config, TinyModel())
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.8
    assert optimizer.defaults["nesterov"]


def test_unknown_optimizer_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="lamb"):
        build_optimizer(_config(**{"TRAIN.OPTIMIZER.NAME": "lamb"}), TinyModel())


def test_learning_rates_scale_linearly_with_total_batch():
    config = _config(
        **{
            "DATA.BATCH_SIZE": 64,
            "TRAIN.ACCUMULATION_STEPS": 2,
            "TRAIN.BASE_LR": 5e-4,
            "TRAIN.WARMUP_LR": 5e-7,
            "TRAIN.MIN_LR": 5e-6,
        }
    )
    base_lr, warmup_lr, min_lr = scale_learning_rates(config, world_size=8)  # total batch 1024
    assert base_lr == pytest.approx(1e-3)
    assert warmup_lr == pytest.approx(1e-6)
    assert min_lr == pytest.approx(1e-5)


@pytest.mark.parametrize("accumulation", [0, 1])
def test_no_accumulation_does_not_scale(accumulation):
    config = _config(**{"DATA.BATCH_SIZE": 128, "TRAIN.ACCUMULATION_STEPS": accumulation})
    base_lr, _, _ = scale_learning_rates(config, world_size=4)
    assert base_lr == pytest.approx(config.TRAIN.BASE_LR)
