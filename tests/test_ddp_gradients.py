"""DDP's gradient sync. DDP buckets the gradients in each parameter's own layout: the bias tables must produce
gradients laid out like the tables, or DDP warns ("Grad strides do not match bucket view strides") and copies them
every step. Under gloo a failed gradient all-reduce is told from a bug by where it came from (GradientSyncWatch)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launch import free_port
from tiny_models import tiny_focal
from torch import nn

from utils.distributed import GradientSyncWatch
from utils.errors import CollectiveError


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


# Rank 1 dies between steps 3 and 4 (after DDP's bucket rebuild); rank 0's next backward finds its peer gone.
_LOST_PEER_DURING_BACKWARD = """
import os, sys, time
import torch
from torch import nn
sys.path.insert(0, {repo!r})
from utils.distributed import GradientSyncWatch, init_distributed
from utils.errors import CollectiveError

info = init_distributed(timeout_s=30)
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4), forward_sync_buffers=False)
watch = GradientSyncWatch().attach(model)
for step in range(4):
    loss = model(torch.ones(2, 4)).sum()
    if step == 3 and info.rank == 1:
        os._exit(3)
    if step == 3:
        time.sleep(1.0)
    try:
        with watch.typed_failures():
            loss.backward()
    except CollectiveError as error:
        print("COLLECTIVE_ERROR", type(error.__cause__).__name__, flush=True)
        os._exit(0)
print("NO_ERROR", model.module.weight.grad.sum().item(), flush=True)
"""


def test_a_peer_lost_during_backward_is_a_collective_error(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_LOST_PEER_DURING_BACKWARD.format(repo=str(Path(__file__).resolve().parents[1])))
    port = free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    workers = [
        subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]  # fmt: skip
    survivor, _ = workers[0].communicate(timeout=120)
    workers[1].communicate(timeout=120)
    assert "COLLECTIVE_ERROR RuntimeError" in survivor, survivor


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a bug in a backward pass")


def test_a_bug_in_backward_keeps_its_own_error(single_process_group):
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 4))
    watch = GradientSyncWatch().attach(model)
    loss = _FailingBackward.apply(model(torch.ones(2, 4))).sum()
    with pytest.raises(RuntimeError, match="a bug in a backward pass") as caught, watch.typed_failures():
        loss.backward()
    assert not isinstance(caught.value, CollectiveError)


def test_watched_gradients_equal_ddps_own(single_process_group):
    plain, watched = (nn.parallel.DistributedDataParallel(tiny_focal()) for _ in range(2))
    GradientSyncWatch().attach(watched)
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, watched):
        model(x).sum().backward()
    for (name, a), b in zip(plain.module.named_parameters(), watched.module.parameters()):
        assert torch.equal(a.grad, b.grad), name
