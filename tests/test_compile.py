"""torch.compile traces whole models: Dynamo finds no graph break in the attention, forward or backward.

Only Dynamo's tracing runs here (``torch._dynamo.explain``), not code generation, so the test stays fast on CPU.
The CPU path (per-image attention with its own autograd Function), the batched path (taken with attention
dropout, and on GPU) and focal-fast (v2) are all traced.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from models import FocalTransformerV2
from tests.tiny_models import TINY_FOCAL, tiny_focal

TINY_V2 = dict(TINY_FOCAL, window_size=4, focal_windows=(3, 3, 1, 1), focal_topK=8)


def graph_breaks(model: torch.nn.Module, train: bool) -> list[str]:
    """Why Dynamo breaks the graph of one forward (and, in train mode, the backward it traces)."""
    torch._dynamo.reset()
    model.train(train)
    images = torch.randn(2, 3, TINY_FOCAL["img_size"], TINY_FOCAL["img_size"])
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(model)(images)
    torch._dynamo.reset()
    return [reason.reason.splitlines()[0] for reason in explanation.break_reasons]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_per_image_cpu_attention_has_no_graph_break(train):
    assert graph_breaks(tiny_focal(drop_path_rate=0.0), train) == []


def test_batched_attention_with_dropout_has_no_graph_break():
    assert graph_breaks(tiny_focal(drop_path_rate=0.0, attn_drop_rate=0.1), train=True) == []


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_focal_fast_has_no_graph_break(train):
    torch.manual_seed(0)
    assert graph_breaks(FocalTransformerV2(**TINY_V2), train) == []
