"""Honest errors: main.py reports the project's own errors (bad config, data or checkpoint, a non-finite loss, a
failed collective) in one line with exit status 1, and lets every other exception, a bug, show its traceback.

Runs call ``main.main`` in this process, which is what ``python main.py`` runs (its return value is the exit
status), on the tiny demo model and toy data of ``tests/launch.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch import free_port, main_args

import main as trainer
from utils import distributed
from utils.errors import CollectiveError, FocalError


def _main(output: Path, toy_root: Path, *extra: str, opts: list[str] | None = None) -> int:
    return trainer.main(main_args(output, toy_root, *extra, opts=opts)[1:])


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "ERROR" in line]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ----------------------------------------------------------------------------------------------------
# A bug keeps its traceback
# ----------------------------------------------------------------------------------------------------


def _failing_loader(error: Exception):
    def build_loader(*args, **kwargs):
        raise error

    return build_loader


def _model_whose_forward_fails(error: Exception):
    real_build_model = trainer.build_model

    def build_model(config):
        model = real_build_model(config)

        def forward(x):
            raise error

        model.forward = forward
        return model

    return build_model


@pytest.mark.parametrize(
    ("target", "make", "error"),
    [
        ("build_loader", _failing_loader, ValueError("planted bug: not enough values to unpack")),
        ("build_loader", _failing_loader, OSError("planted bug: bad file descriptor")),
        (
            "build_model",
            _model_whose_forward_fails,
            RuntimeError("planted bug: mat1 and mat2 shapes cannot be multiplied"),
        ),
    ],
    ids=["value-error-in-data", "os-error-in-data", "runtime-error-in-forward"],
)
def test_a_bug_propagates_with_its_traceback(toy_root, tmp_path, capsys, monkeypatch, target, make, error):
    monkeypatch.setattr(trainer, target, make(error))
    with pytest.raises(type(error)) as raised:
        _main(tmp_path, toy_root)
    assert raised.value is error  # not wrapped, not reported as a one-line error
    assert "ERROR" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Bad input or a failed run is one line, exit status 1
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["TRAIN.OPTIMIZER.NAME", "lamb"], r"ConfigError: unknown optimizer TRAIN.OPTIMIZER.NAME='lamb'"),
        (["TRAIN.LR_SCHEDULER.NAME", "poly"], r"ConfigError: unknown LR scheduler 'poly' \(TRAIN.LR_SCHEDULER.NAME\)"),
        (["AMP_DTYPE", "fp8"], r"ConfigError: unknown AMP_DTYPE 'fp8'"),
        (["TRAIN.ACCUMULATION_STEPS", "6"], r"ConfigError: TRAIN.ACCUMULATION_STEPS 6 is more than the 5 batches"),
        (["SAVE_KEEP", "-1"], r"ConfigError: keep \(SAVE_KEEP\) must be >= 0, got -1"),
        (
            ["MODEL.FOCAL.PATCH_SIZE", "5"],
            r"ConfigError: cannot build \S+ for DATA.IMG_SIZE 32, MODEL.FOCAL.PATCH_SIZE 5",
        ),
    ],
    ids=["optimizer", "lr-scheduler", "amp-dtype", "accumulation", "save-keep", "model"],
)
def test_a_bad_config_value_found_at_build_time_is_one_line(toy_root, tmp_path, capsys, opts, message):
    assert _main(tmp_path, toy_root, opts=opts) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert re.search(message, line), line


def test_a_data_folder_without_class_folders_is_one_line_naming_it(toy_root, tmp_path, capsys):
    data = tmp_path / "imagenet"
    (data / "train").mkdir(parents=True)
    assert _main(tmp_path, toy_root, "--data-path", str(data), opts=["DATA.DATASET", "imagenet"]) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert f"MissingDataError: image folder {data / 'train'}: Couldn't find any class folder" in line, line


def test_a_zip_that_is_not_a_zip_archive_is_one_line_naming_it(toy_root, tmp_path, capsys):
    data = tmp_path / "imagenet"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.zip").write_bytes(b"not a zip archive")
        (data / f"{split}_map.txt").write_text("a/1.JPEG\t0\n")
    assert _main(tmp_path, toy_root, "--data-path", str(data), "--zip", opts=["DATA.DATASET", "imagenet"]) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert f"DataError: zip file {data / 'train.zip'} cannot be read as a zip archive" in line, line


def test_a_missing_or_corrupt_checkpoint_is_one_line_naming_it(toy_root, tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert _main(tmp_path / "a", toy_root, "--eval", "--resume", str(missing)) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert f"MissingCheckpointError: checkpoint {missing} does not exist" in line, line

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 these bytes are no checkpoint")
    assert _main(tmp_path / "b", toy_root, "--eval", "--resume", str(corrupt)) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert f"CorruptCheckpointError: checkpoint {corrupt} is corrupt" in line, line


def test_a_non_finite_loss_is_one_line_naming_the_step(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "build_criterion", lambda config, mixup: lambda outputs, targets: outputs.sum() / 0)
    assert _main(tmp_path, toy_root) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert "NonFiniteLossError: non-finite loss at epoch 0 step 0" in line, line


# ----------------------------------------------------------------------------------------------------
# Failed collectives, recognised by type
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def single_process_group(monkeypatch):
    """A 1-process gloo group: the collective helpers then call the backend (which tests make fail)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # main.py itself runs as a single process
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():  # main.py leaves the group on its way out
        dist.destroy_process_group()


def _backend_failure(*args, **kwargs):
    raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:41000")


@pytest.mark.parametrize(
    ("backend_call", "helper"),
    [
        ("barrier", distributed.barrier),
        ("all_reduce", lambda: distributed.all_reduce_sum(torch.ones(2))),
        ("all_reduce", lambda: distributed.any_rank(True, torch.device("cpu"))),
        ("all_gather_object", lambda: distributed.all_gather_objects({"epoch": 1})),
        ("broadcast_object_list", lambda: distributed.broadcast_object({"epoch": 1})),
    ],
    ids=["barrier", "all_reduce_sum", "any_rank", "all_gather_objects", "broadcast_object"],
)
def test_a_collective_whose_backend_fails_raises_collective_error(
    single_process_group, monkeypatch, backend_call, helper
):
    monkeypatch.setattr(dist, backend_call, _backend_failure)
    with pytest.raises(CollectiveError, match=f"{backend_call} failed: .*Connection closed by peer") as raised:
        helper()
    assert type(raised.value.__cause__) is RuntimeError  # the backend's error is chained, not lost


def test_collective_helpers_pass_results_through_when_the_backend_works(single_process_group):
    assert distributed.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    assert distributed.any_rank(True, torch.device("cpu")) and not distributed.any_rank(False, torch.device("cpu"))
    assert distributed.all_gather_objects("a") == ["a"] and distributed.broadcast_object("b") == "b"
    distributed.barrier()


def _rank_whose_peer_dies(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    distributed.init_distributed(timeout_s=30)
    distributed.barrier()
    if rank == 1:
        os._exit(0)  # dies without leaving the group, as a killed rank does
    time.sleep(0.5)
    try:
        distributed.all_reduce_sum(torch.ones(1))
        result = {"type": None}
    except Exception as error:  # noqa: BLE001 - the test reads which type the survivor got
        result = {"type": type(error).__name__, "cause": type(error.__cause__).__name__, "message": str(error)}
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo path is the CPU one")
def test_the_survivor_of_a_dead_rank_gets_collective_error(tmp_path):
    """A real 2-process gloo group: rank 1 dies, rank 0's next all-reduce raises CollectiveError (gloo itself
    raises a plain RuntimeError)."""
    mp.start_processes(_rank_whose_peer_dies, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert (result["type"], result["cause"]) == ("CollectiveError", "RuntimeError"), result
    assert result["message"].startswith("all_reduce failed: "), result


def test_main_reports_a_failed_collective_in_one_line(single_process_group, toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", _backend_failure)  # the training loop's first all-reduce fails
    assert _main(tmp_path, toy_root) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert "a collective failed, most likely because another rank failed (see its log): CollectiveError: " in line
    assert "all_reduce failed: " in line and "Connection closed by peer" in line


def test_main_reports_a_backend_dist_error_as_a_failed_collective(toy_root, tmp_path, capsys, monkeypatch):
    """NCCL raises dist.DistError subclasses, also where no helper of ours runs (DDP's gradient all-reduce)."""
    error = dist.DistBackendError("NCCL communicator was aborted on rank 0")
    monkeypatch.setattr(trainer, "build_model", _model_whose_forward_fails(error))
    assert _main(tmp_path, toy_root) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert "a collective failed, most likely because another rank failed (see its log): DistBackendError: NCCL" in line


def test_every_project_error_keeps_its_builtin_base():
    """Callers that catch the builtin types the raise sites used before still catch them."""
    from config import ConfigError
    from data.datasets import CorruptImageError
    from engine import NonFiniteLossError
    from utils.checkpoint import CheckpointError, CorruptCheckpointError, MissingCheckpointError
    from utils.errors import DataError, MissingDataError

    for error, base in [
        (ConfigError, ValueError),
        (DataError, ValueError),
        (CorruptImageError, ValueError),
        (MissingDataError, FileNotFoundError),
        (CheckpointError, RuntimeError),
        (CorruptCheckpointError, RuntimeError),
        (MissingCheckpointError, FileNotFoundError),
        (NonFiniteLossError, RuntimeError),
        (CollectiveError, RuntimeError),
    ]:
        assert issubclass(error, FocalError) and issubclass(error, base), error
