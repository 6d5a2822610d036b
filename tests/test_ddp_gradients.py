"""DDP buckets the gradients in each parameter's own layout: the bias tables must produce gradients laid out
like the tables, or DDP warns ("Grad strides do not match bucket view strides") and copies them every step."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from tiny_models import tiny_focal
from torch import nn


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_bias_table_gradients_have_the_layout_of_the_tables():
    model = tiny_focal()  # stage heads 1, 2, 2, 4: a single-head table is where the strides used to differ
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    tables = [(name, p) for name, p in model.named_parameters() if "relative_position_bias_table" in name]
    assert tables
    for name, param in tables:
        assert param.grad.stride() == param.stride(), name


def test_ddp_training_step_gives_no_grad_stride_warning(single_process_group):
    model = nn.parallel.DistributedDataParallel(tiny_focal())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the bucket views are compared with the gradients from the second step on
            model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert not [w for w in caught if "strides" in str(w.message)]
