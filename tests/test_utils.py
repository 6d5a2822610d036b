"""Training utilities: logging, distributed helpers, checkpoints, mixed precision steps, metrics."""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from launch import free_port
from yacs.config import CfgNode

from config import get_default_config
from utils import distributed
from utils.amp import GradientStepper, resolve_amp_dtype
from utils.checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    MissingCheckpointError,
    UnsafeCheckpointError,
    capture_rng_state,
    load_checkpoint_file,
    restore_rng_state,
    save_checkpoint_atomic,
)
from utils.errors import ConfigError
from utils.logger import create_logger, get_logger
from utils.metrics import AverageMeter, MetricsWriter, accuracy_counts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------
# Logger
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def logger_name(request):
    """A fresh logger name per test; its handlers are closed afterwards."""
    name = f"focal_test_{request.node.name}"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_logger_writes_rank_file_once_when_created_twice(tmp_path, logger_name):
    create_logger(str(tmp_path), dist_rank=0, name=logger_name)
    logger = create_logger(str(tmp_path), dist_rank=0, name=logger_name)
    logger.info("hello once")
    assert len(logger.handlers) == 2  # console + file, not doubled
    assert _read(tmp_path / "log_rank0.txt").count("hello once") == 1


def test_logger_has_no_console_on_other_ranks(tmp_path, logger_name):
    logger = create_logger(str(tmp_path), dist_rank=3, name=logger_name)
    logger.info("rank three")
    assert [type(h) for h in logger.handlers] == [logging.FileHandler]
    assert "rank three" in _read(tmp_path / "log_rank3.txt")


def test_module_loggers_reach_the_run_log(tmp_path):
    logger = create_logger(str(tmp_path), dist_rank=1)
    try:
        get_logger("some.module").warning("from a module")
        assert "from a module" in _read(tmp_path / "log_rank1.txt")
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.propagate = True


# ----------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [None, "1"])
def test_single_process_without_torchrun(monkeypatch, world_size):
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.is_distributed) == (0, 1, False)
    assert not torch.distributed.is_initialized()
    assert distributed.is_main_process()
    distributed.barrier()
    tensor = torch.tensor([2.0])
    assert distributed.all_reduce_sum(tensor) is tensor and tensor.item() == 2.0
    distributed.cleanup()


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = distributed.init_distributed(timeout_s=60)
    total = distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
    distributed.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"sum": total.item(), "main": distributed.is_main_process(), "world": info.world_size}, f)
    distributed.cleanup()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo path is the CPU one")
def test_two_gloo_processes_sum_across_ranks(tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch again.
    mp.start_processes(_distributed_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    results = [json.loads(_read(tmp_path / f"rank{rank}.json")) for rank in range(2)]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["main"] for r in results] == [True, False]
    assert [r["world"] for r in results] == [2, 2]


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic save, safe load
# ----------------------------------------------------------------------------------------------------


def _state(epoch: int) -> dict:
    return {"model": {"w": torch.full((4,), float(epoch))}, "epoch": epoch}


def _crash_during_torch_save(monkeypatch):
    def partial_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", partial_save)


def _crash_at_fsync(monkeypatch):
    def failing_fsync(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)


def _crash_at_rename(monkeypatch):
    def failing_replace(src, dst):
        raise OSError("killed before rename")

    monkeypatch.setattr(os, "replace", failing_replace)


@pytest.mark.parametrize("crash", [_crash_during_torch_save, _crash_at_fsync, _crash_at_rename])
def test_crash_while_saving_keeps_the_previous_file(tmp_path, monkeypatch, crash):
    path = str(tmp_path / "last.pth")
    save_checkpoint_atomic(_state(1), path)
    with monkeypatch.context() as patch:
        crash(patch)
        with pytest.raises((RuntimeError, OSError)):
            save_checkpoint_atomic(_state(2), path)
    assert load_checkpoint_file(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]  # the temporary file is cleaned up


def test_crash_on_first_save_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    _crash_during_torch_save(monkeypatch)
    with pytest.raises(RuntimeError):
        save_checkpoint_atomic(_state(1), path)
    assert not os.path.exists(path)


def test_process_killed_mid_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "last.pth")
    script = (
        "import os, signal, torch\n"
        "from utils.checkpoint import save_checkpoint_atomic\n"
        "def killed_save(obj, f):\n"
        "    f.write(b'PK partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed_save\n"
        f"save_checkpoint_atomic({{'epoch': 1}}, {path!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert not os.path.exists(path)
    assert len(os.listdir(tmp_path)) == 1  # only the orphaned temporary file
    CheckpointManager(str(tmp_path), keep=1, logger=logging.getLogger("test"))
    assert os.listdir(tmp_path) == []


def test_saved_checkpoint_loads_back(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint_atomic(_state(7), path)
    loaded = load_checkpoint_file(path)
    assert loaded["epoch"] == 7
    assert torch.equal(loaded["model"]["w"], torch.full((4,), 7.0))


def test_saved_file_gets_umask_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        save_checkpoint_atomic(_state(1), str(tmp_path / "ckpt.pth"))
    finally:
        os.umask(old_umask)
    assert os.stat(tmp_path / "ckpt.pth").st_mode & 0o777 == 0o644


class _WritesFileWhenUnpickled:
    """A payload that would create ``path`` if its pickle were executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unsafe_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": _WritesFileWhenUnpickled(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*io\.open"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_checkpoint_with_yacs_config_loads(tmp_path):
    config = get_default_config()
    config.freeze()
    path = str(tmp_path / "released.pth")
    torch.save({"model": {"w": torch.ones(2)}, "config": config, "epoch": 299}, path)
    loaded = load_checkpoint_file(path)["config"]
    assert isinstance(loaded, CfgNode) and isinstance(loaded.TRAIN.OPTIMIZER, CfgNode)
    assert loaded == config
    assert loaded.is_frozen()
    assert loaded.dump() == config.dump()


@pytest.mark.parametrize(
    "damage",
    [lambda raw: raw[: len(raw) // 2], lambda raw: raw[:-10], lambda raw: b"", lambda raw: b"not a checkpoint" * 10],
    ids=["half", "tail-cut", "empty", "garbage"],
)
def test_damaged_file_is_corrupt_error_naming_it(tmp_path, damage):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint_atomic(_state(1), path)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(CorruptCheckpointError, match=r"ckpt\.pth"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("name", ["nope.pth", "nope.safetensors"])
def test_missing_file_is_file_not_found(tmp_path, name):
    with pytest.raises(MissingCheckpointError, match=f"checkpoint {re.escape(str(tmp_path / name))} does not exist"):
        load_checkpoint_file(str(tmp_path / name))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the manager
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def manager_logger():
    """A logger that propagates to pytest's caplog."""
    return logging.getLogger("test_checkpoint_manager")


def test_pruning_keeps_newest_k_plus_last_and_best(tmp_path, manager_logger):
    manager = CheckpointManager(str(tmp_path), keep=2, logger=manager_logger)
    for epoch in range(5):
        manager.save(_state(epoch), epoch=epoch, is_best=epoch == 1)
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "ckpt_epoch_3.pth", "ckpt_epoch_4.pth", "last.pth"]
    assert load_checkpoint_file(str(tmp_path / "best.pth"))["epoch"] == 1
    assert load_checkpoint_file(str(tmp_path / "last.pth"))["epoch"] == 4


def test_non_periodic_save_writes_only_last(tmp_path, manager_logger):
    manager = CheckpointManager(str(tmp_path), keep=2, logger=manager_logger)
    paths = manager.save(_state(0), epoch=0, periodic=False)
    assert paths == [str(tmp_path / "last.pth")]
    assert os.listdir(tmp_path) == ["last.pth"]


def test_latest_valid_prefers_highest_stored_epoch(tmp_path, manager_logger):
    manager = CheckpointManager(str(tmp_path), keep=3, logger=manager_logger)
    manager.save(_state(2), epoch=2)
    manager.save(_state(3), epoch=3, periodic=False)
    path, state = manager.latest_valid()
    assert path == str(tmp_path / "last.pth") and state["epoch"] == 3


def test_latest_valid_resumes_from_last_on_equal_epochs(tmp_path, manager_logger):
    manager = CheckpointManager(str(tmp_path), keep=3, logger=manager_logger)
    manager.save(_state(0), epoch=0, is_best=True)
    path, _ = manager.latest_valid()
    assert path == str(tmp_path / "last.pth")


def test_latest_valid_skips_corrupt_files_with_a_warning(tmp_path, manager_logger, caplog):
    manager = CheckpointManager(str(tmp_path), keep=3, logger=manager_logger)
    manager.save(_state(1), epoch=1)
    manager.save(_state(2), epoch=2)
    for name in ("ckpt_epoch_2.pth", "last.pth"):  # both hold epoch 2
        with open(tmp_path / name, "r+b") as f:
            f.truncate(100)
    with caplog.at_level(logging.WARNING, logger=manager_logger.name):
        path, state = manager.latest_valid()
    assert path == str(tmp_path / "ckpt_epoch_1.pth") and state["epoch"] == 1
    assert "ckpt_epoch_2.pth" in caplog.text and "last.pth" in caplog.text


def test_latest_valid_is_none_for_an_empty_folder(tmp_path, manager_logger):
    assert CheckpointManager(str(tmp_path), logger=manager_logger).latest_valid() is None


def test_latest_valid_refuses_an_unsafe_file(tmp_path, manager_logger):
    torch.save({"epoch": 9, "payload": _WritesFileWhenUnpickled(str(tmp_path / "pwned"))}, tmp_path / "last.pth")
    with pytest.raises(UnsafeCheckpointError):
        CheckpointManager(str(tmp_path), logger=manager_logger).latest_valid()
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()


def test_rng_state_survives_a_checkpoint_and_reproduces_numbers(tmp_path):
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = str(tmp_path / "rng.pth")
    save_checkpoint_atomic({"rng": capture_rng_state()}, path)
    expected = _draw()
    _draw()
    restore_rng_state(load_checkpoint_file(path)["rng"])
    assert _draw() == expected


# ----------------------------------------------------------------------------------------------------
# Mixed precision and the gradient step
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("none", None), ("bf16", torch.bfloat16), ("BF16", torch.bfloat16), ("fp16", torch.float16), ("auto", None)],
)
def test_resolve_amp_dtype_on_cpu(name, expected):
    assert resolve_amp_dtype(name, torch.device("cpu")) == expected


def test_unknown_amp_dtype_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="fp8"):
        resolve_amp_dtype("fp8", "cpu")


GRAD = torch.tensor([3.0, 4.0, 0.0])  # norm 5


def _param_and_sgd() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.zeros(3))
    return param, torch.optim.SGD([param], lr=1.0)


def test_stepper_clips_to_max_norm_and_returns_the_norm_before_clipping():
    param, optimizer = _param_and_sgd()
    norm = GradientStepper(None, "cpu")((param * GRAD).sum(), optimizer, [param], clip_grad=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(param.detach(), -GRAD / 5.0)
    assert param.grad is None  # zeroed for the next step


def test_stepper_without_clipping_still_reports_the_norm():
    param, optimizer = _param_and_sgd()
    norm = GradientStepper(None, "cpu")((param * GRAD).sum(), optimizer, [param], clip_grad=0.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(param.detach(), -GRAD)


def test_stepper_accumulates_across_micro_steps():
    param, optimizer = _param_and_sgd()
    stepper = GradientStepper(None, "cpu")
    assert stepper((param * GRAD).sum(), optimizer, [param], clip_grad=100.0, update=False) is None
    assert torch.equal(param.detach(), torch.zeros(3))  # no step yet
    norm = stepper((param * GRAD).sum(), optimizer, [param], clip_grad=100.0, update=True)
    assert norm.item() == pytest.approx(10.0)
    assert torch.allclose(param.detach(), -2 * GRAD)


def test_fp16_stepper_unscales_before_clipping_and_saves_its_scale():
    param, optimizer = _param_and_sgd()
    stepper = GradientStepper(torch.float16, "cpu")
    norm = stepper((param * GRAD).sum(), optimizer, [param], clip_grad=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.allclose(param.detach(), -GRAD / 5.0)
    state = stepper.state_dict()
    resumed = GradientStepper(torch.float16, "cpu")
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_full_precision_stepper_ignores_loss_scale_state():
    stepper = GradientStepper(None, "cpu")
    stepper.load_state_dict({"scale": 1024.0})
    assert stepper.state_dict() == {}


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def test_accuracy_counts_top1_and_top5():
    output = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
            [0.1, 0.9, 0.5, 0.4, 0.3, 0.2],  # label 2: top-5 only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: last, outside the top 5
        ]
    )
    counts = accuracy_counts(output, torch.tensor([0, 2, 5]), topk=(1, 5))
    assert counts.tolist() == [1, 2]
    assert counts.dtype == torch.int64


def test_accuracy_counts_with_fewer_classes_than_k():
    output = torch.tensor([[0.2, 0.8], [0.7, 0.3]])
    assert accuracy_counts(output, torch.tensor([0, 0]), topk=(1, 5)).tolist() == [1, 2]


def test_average_meter_weights_by_count():
    meter = AverageMeter()
    meter.update(1.0, n=1)
    meter.update(4.0, n=3)
    assert (meter.val, meter.count, meter.avg) == (4.0, 4, pytest.approx(3.25))


def test_metrics_writer_appends_json_lines_and_tensorboard_events(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.add_scalars(10, {"train/loss": 2.5, "train/lr": torch.tensor(1e-3)})
    writer.log_epoch({"epoch": 0, "acc1": 10.0, "acc5": torch.tensor(30.0), "throughput": 100})
    writer.log_epoch({"epoch": 1, "acc1": 20.0, "note": "text is kept"})
    writer.close()
    lines = _read(tmp_path / "metrics.jsonl").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"epoch": 0, "acc1": 10.0, "acc5": 30.0, "throughput": 100},
        {"epoch": 1, "acc1": 20.0, "note": "text is kept"},
    ]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_disabled_metrics_writer_creates_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
    writer.log_epoch({"epoch": 0, "acc1": 1.0})
    writer.add_scalars(0, {"train/loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_installable_modules_are_every_runtime_module():
    """`pip install -e .` installs what pyproject lists: every top-level package and module the code imports at
    run time (tests/ and tools/ run from the repository)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    repo = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {path.parent.name for path in repo.glob("*/__init__.py")} - {"tests", "tools"}
    modules = {path.stem for path in repo.glob("*.py")}
    assert set(setuptools["packages"]) == packages
    assert set(setuptools["py-modules"]) == modules
