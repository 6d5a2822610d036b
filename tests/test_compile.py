"""torch.compile traces whole models: Dynamo finds no graph break in the attention, forward or backward.

Only Dynamo's tracing runs here (``torch._dynamo.explain``), not code generation, so the test stays fast on CPU.
The CPU path (per-image attention with its own autograd Function), the batched path (taken with attention
dropout, and on GPU) and focal-fast (v2) are all traced, and so is the fused path (the GPU's Triton kernels, run here
through Triton's interpreter): its two custom operators are opaque to Dynamo, and AOTAutograd's trace of forward and
backward through their fake versions computes what eager does.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from models import FocalTransformerV2
from models import fused_focal_attention as fused
from tests.tiny_models import TINY_FOCAL, tiny_focal

TINY_V2 = dict(TINY_FOCAL, window_size=4, focal_windows=(3, 3, 1, 1), focal_topK=8)


def explain(model: torch.nn.Module, train: bool, device: str = "cpu"):
    """Dynamo's account of tracing one forward (with autograd on in train mode)."""
    torch._dynamo.reset()
    model.to(device).train(train)
    images = torch.randn(2, 3, TINY_FOCAL["img_size"], TINY_FOCAL["img_size"], device=device)
    with torch.set_grad_enabled(train):
        explanation = torch._dynamo.explain(model)(images)
    torch._dynamo.reset()
    return explanation


def break_reasons(explanation) -> list[str]:
    """Why Dynamo broke the graph, one line per break."""
    return [reason.reason.splitlines()[0] for reason in explanation.break_reasons]


def graph_breaks(model: torch.nn.Module, train: bool) -> list[str]:
    """Why Dynamo breaks the graph of one forward."""
    return break_reasons(explain(model, train))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_per_image_cpu_attention_has_no_graph_break(train):
    assert graph_breaks(tiny_focal(drop_path_rate=0.0), train) == []


def test_batched_attention_with_dropout_has_no_graph_break():
    assert graph_breaks(tiny_focal(drop_path_rate=0.0, attn_drop_rate=0.1), train=True) == []


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_focal_fast_has_no_graph_break(train):
    torch.manual_seed(0)
    assert graph_breaks(FocalTransformerV2(**TINY_V2), train) == []


needs_triton = pytest.mark.skipif(fused.triton is None, reason="triton is not installed")
FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in Triton's interpreter


@needs_triton
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fused_attention_has_no_graph_break(version, train):
    torch.manual_seed(0)
    model = tiny_focal(drop_path_rate=0.0) if version == "v1" else FocalTransformerV2(**TINY_V2)
    model.set_attn_impl("fused")  # on CPU through Triton's interpreter (tests/conftest.py)
    explanation = explain(model, train, FUSED_DEVICE)
    assert break_reasons(explanation) == []
    (graph,) = explanation.graphs
    assert "focal.fused_attention_forward" in graph.code  # the attention went through the fused operator


@needs_triton
def test_compiled_fused_attention_matches_eager():
    """One full graph, forward and backward (AOTAutograd through the operators' fake versions, then run eagerly):
    the same logits and parameter gradients as the uncompiled model."""
    model = tiny_focal(drop_path_rate=0.0).to(FUSED_DEVICE)
    model.set_attn_impl("fused")
    images = torch.randn(2, 3, TINY_FOCAL["img_size"], TINY_FOCAL["img_size"], device=FUSED_DEVICE)

    def logits_and_gradients(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(images)
        logits.square().sum().backward()
        return logits.detach(), {name: p.grad for name, p in model.named_parameters()}

    torch._dynamo.reset()
    compiled = logits_and_gradients(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    eager = logits_and_gradients(model)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
