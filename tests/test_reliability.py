"""Reliability of main.py: bit-exact resume after a kill or a stop signal, atomic and safe checkpoints,
one-line errors for bad input, and a job that ends when one rank fails.

Runs that must be real processes (killed, signalled, torchrun) start main.py as users do; error checks
call ``main.main`` in this process, which is what ``python main.py`` runs (its return value is the exit
status), to keep this file fast on a small CPU machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from launch import REPO, _env, main_args, run_dir, run_main
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import main as trainer
from data.resumable import EpochSeededDataset, ResumableSampler
from utils.checkpoint import CheckpointManager, load_checkpoint_file
from utils.distributed import StopRequest

# Batch 2: 40 steps per epoch on one process, 20 per rank on two, so a signal lands mid-epoch.
RESUME_OPTS = ["DATA.BATCH_SIZE", "2", "SAVE_FREQ", "1"]
STEPS_1, STEPS_2 = 40, 20
TIMING_KEYS = {"epoch_time", "images_per_s"}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(autouse=True)
def _close_run_logger():
    """In-process runs attach handlers to the 'focal' logger; close them after each test."""
    yield
    logger = logging.getLogger("focal")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


class Run:
    """main.py started in the background (alone or under torchrun), its output collected line by line."""

    def __init__(self, args: list[str], nproc: int = 1) -> None:
        prefix = [sys.executable]
        if nproc > 1:
            prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        self.proc = subprocess.Popen(
            [*prefix, *args],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so a kill can take the workers too
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 180) -> str:
        """The first output line matching ``pattern`` (fails if the run ends or the time runs out first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        self.kill()
        pytest.fail(f"no line matching {pattern!r}:\n" + "".join(self.lines[-40:]))

    def kill(self) -> None:
        """SIGKILL every process of the run at once: no handler runs, nothing is saved (a crash, a lost node).

        torchrun starts each worker in a session of its own, so their process groups are killed too.
        """
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for group in [self.proc.pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.finish()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """(exit status, all output) once the run has ended."""
        self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return self.proc.returncode, "".join(self.lines)


def _tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Model weights and optimizer moments of a checkpoint, by name."""
    tensors = {f"model.{k}": v for k, v in checkpoint["model"].items()}
    for index, moments in checkpoint["optimizer"]["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)})
    return tensors


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def assert_same_result(run: Path, reference: Path) -> None:
    """Identical final weights and optimizer state (bit for bit) and identical metrics rows."""
    ours, theirs = load_checkpoint_file(str(run / "last.pth")), load_checkpoint_file(str(reference / "last.pth"))
    assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
    ours, theirs = _tensors(ours), _tensors(theirs)
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert _rows(run) == _rows(reference)


def _reference(tmp_path_factory, toy_root: Path, nproc: int) -> Path:
    output = tmp_path_factory.mktemp(f"reference{nproc}")
    result = run_main(main_args(output, toy_root, opts=RESUME_OPTS), nproc=nproc)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir(output)


@pytest.fixture(scope="module")
def reference_1(tmp_path_factory, toy_root) -> Path:
    """An uninterrupted 2-epoch run on one process."""
    return _reference(tmp_path_factory, toy_root, 1)


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory, toy_root) -> Path:
    """An uninterrupted 2-epoch run on two processes (torchrun)."""
    return _reference(tmp_path_factory, toy_root, 2)


# ----------------------------------------------------------------------------------------------------
# 1 + 2. Bit-exact resume after a kill, and after a stop signal mid-epoch
# ----------------------------------------------------------------------------------------------------


def _interrupt_twice_and_finish(output: Path, toy_root: Path, nproc: int, steps: int, workers: str) -> None:
    """Kill a run after its epoch-0 checkpoint, resume it and stop it with SIGTERM mid-epoch 1, resume again.

    The SIGTERM goes to the process main.py runs in: torchrun's agent when ``nproc`` > 1, which
    forwards it to every worker.
    """
    args = main_args(output, toy_root, opts=RESUME_OPTS)
    first = Run(args, nproc)
    first.wait_for(r"saved epoch 0 checkpoint")
    first.kill()

    resumed_args = main_args(output, toy_root, opts=[*RESUME_OPTS, "DATA.NUM_WORKERS", workers])
    second = Run(resumed_args, nproc)
    second.wait_for(r"resumed from .*last\.pth: starting at epoch 1$")
    second.wait_for(rf"Train: \[1/2\]\[0/{steps}\]")
    second.proc.send_signal(signal.SIGTERM)
    status, out = second.finish()
    stopped = re.search(r"stopped on request \(SIGTERM\) at epoch 1 step (\d+)", out)
    assert stopped, out[-3000:]
    if nproc == 1:
        assert status == 0, out[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < steps

    third = run_main(args, nproc=nproc)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"starting at epoch 1 step {step}" in third.stdout


def test_killed_and_stopped_run_resumes_bit_exactly_on_one_process(reference_1, toy_root, tmp_path):
    # The resumed parts load with a worker process: augmentation must not depend on who loads a sample.
    _interrupt_twice_and_finish(tmp_path, toy_root, 1, STEPS_1, workers="1")
    assert_same_result(run_dir(tmp_path), reference_1)


def test_killed_and_stopped_torchrun_job_resumes_bit_exactly_on_two_processes(reference_2, toy_root, tmp_path):
    _interrupt_twice_and_finish(tmp_path, toy_root, 2, STEPS_2, workers="0")
    assert_same_result(run_dir(tmp_path), reference_2)
    checkpoint = load_checkpoint_file(str(run_dir(tmp_path) / "last.pth"))
    assert len(checkpoint["rank_states"]) == 2  # every rank's RNG state is saved


class _Recording(Dataset):
    """Returns a random draw per item and records which indices were loaded (in this process)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.loaded.append(index)
        return torch.rand(3), index


def _loader(dataset: Dataset, sampler: ResumableSampler, workers: int) -> DataLoader:
    return DataLoader(EpochSeededDataset(dataset, seed=7), sampler=sampler, batch_size=4, num_workers=workers)


def test_resumed_epoch_skips_done_batches_unread_and_draws_the_same_augmentations():
    dataset = _Recording(32)
    sampler = ResumableSampler(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=7))
    sampler.set_epoch(3)
    full = list(_loader(dataset, sampler, workers=0))
    dataset.loaded.clear()
    sampler.set_epoch(3, start=2 * 4)  # resume after two batches of 4
    assert len(_loader(dataset, sampler, workers=0)) == len(full) - 2
    tail = list(_loader(dataset, sampler, workers=0))
    assert len(dataset.loaded) == 32 - 8  # the done batches are never loaded
    for (draws, indices), (expected_draws, expected_indices) in zip(tail, full[2:], strict=True):
        assert torch.equal(indices, expected_indices) and torch.equal(draws, expected_draws)
    sampler.set_epoch(3, start=8)
    from_worker = list(_loader(dataset, sampler, workers=1))  # loaded in another process
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_worker, tail, strict=True))


def test_stop_signals_set_the_flag_and_the_previous_handlers_come_back():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert stop() and stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_checkpoints_rank_by_epoch_then_steps_done_not_by_file_age(tmp_path):
    manager = CheckpointManager(str(tmp_path), logger=logging.getLogger("focal.test"))
    manager.save({"step": 40, "epoch_done": True}, epoch=0, periodic=True)  # ckpt_epoch_0.pth and last.pth
    manager.save({"step": 7, "epoch_done": False}, epoch=1, periodic=False)  # stopped in epoch 1
    path, state = manager.latest_valid()
    assert path.endswith("last.pth") and (state["epoch"], state["step"]) == (1, 7)
    manager.save({"step": 40, "epoch_done": True}, epoch=1, periodic=True)
    manager.save({"step": 3, "epoch_done": False}, epoch=1, periodic=False)  # newer, fewer steps
    path, state = manager.latest_valid()
    assert path.endswith("ckpt_epoch_1.pth") and state["step"] == 40


# ----------------------------------------------------------------------------------------------------
# 3. Atomic checkpoints: damaged files are skipped
# ----------------------------------------------------------------------------------------------------


def test_truncated_checkpoints_are_skipped_with_a_warning_and_the_newest_valid_one_is_used(
    reference_1, toy_root, tmp_path
):
    run = run_dir(tmp_path)
    run.mkdir(parents=True)
    for name in ("ckpt_epoch_0.pth", "metrics.jsonl"):
        (run / name).write_bytes((reference_1 / name).read_bytes())
    last = (reference_1 / "last.pth").read_bytes()
    (run / "last.pth").write_bytes(last[: len(last) // 2])  # as if cut short by a full disk
    (run / "ckpt_epoch_1.pth").write_bytes(b"not a checkpoint")
    stale = run / f".last.pth.{'0' * 32}.tmp"  # left by a save that was killed
    stale.write_bytes(last[:1000])

    result = run_main(main_args(tmp_path, toy_root, opts=RESUME_OPTS))
    assert result.returncode == 0, result.stdout + result.stderr
    log = (run / "log_rank0.txt").read_text()
    assert re.search(r"WARNING skipping it: checkpoint \S*last\.pth is corrupt or truncated", log)
    assert re.search(r"WARNING skipping it: checkpoint \S*ckpt_epoch_1\.pth is corrupt", log)
    assert re.search(r"resumed from \S*ckpt_epoch_0\.pth: starting at epoch 1", log)
    assert not stale.exists()
    assert_same_result(run, reference_1)


# ----------------------------------------------------------------------------------------------------
# 4. Safe loading and safetensors
# ----------------------------------------------------------------------------------------------------


class _CreatesAFile:
    """Pickles as a call to open(path, 'w'): loading it unsafely would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_eval_refuses_a_checkpoint_whose_pickle_would_run_code(toy_root, tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pth"
    torch.save({"model": {}, "payload": _CreatesAFile(marker)}, crafted)
    result = run_main(main_args(tmp_path / "out", toy_root, "--eval", "--resume", str(crafted)))
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and re.search(
        r"refusing to load checkpoint \S*crafted\.pth: its pickle needs io\.open", errors[0]
    )
    assert "Traceback" not in result.stdout + result.stderr
    assert not marker.exists()


def test_safetensors_conversion_round_trips_and_evaluates_like_the_checkpoint(reference_1, toy_root, tmp_path):
    from tools.convert_checkpoint import main as convert

    weights = tmp_path / "demo.safetensors"
    assert convert([str(reference_1 / "last.pth"), "--output", str(weights)]) == 0
    original = load_checkpoint_file(str(reference_1 / "last.pth"))
    loaded = load_checkpoint_file(str(weights))
    assert loaded["model"].keys() == original["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in original["model"].items())
    assert loaded["epoch"] == original["epoch"] == 1 and loaded["config"] == original["config"]

    output = tmp_path / "eval"
    assert trainer.main(main_args(output, toy_root, "--eval", "--resume", str(weights))[1:]) == 0
    result = json.loads((run_dir(output) / "eval_results.json").read_text())
    last_row = _rows(reference_1)[-1]
    assert result["acc1"] == last_row["acc1"]
    assert result["loss"] == pytest.approx(last_row["loss"], rel=1e-6)  # this process runs 2 threads, the run 1


# ----------------------------------------------------------------------------------------------------
# 5 + 7. Bad input: one line naming the problem, non-zero exit, nothing half-written
# ----------------------------------------------------------------------------------------------------


def _main(output: Path, toy_root: Path, *extra: str, opts: list[str] | None = None, cfg: str | None = None) -> int:
    """main.main as ``python main.py`` runs it: the exit status (argparse exits with SystemExit)."""
    args = main_args(output, toy_root, *extra, opts=opts)[1:]
    if cfg is not None:
        args[args.index("--cfg") + 1] = cfg
    try:
        return trainer.main(args)
    except SystemExit as exit_:
        return exit_.code


def _one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize(
    ("opts", "extra", "status", "message"),
    [
        (["DATA.BATCH_SIZ", "4"], [], 2, r"unknown config key DATA.BATCH_SIZ \(did you mean 'DATA.BATCH_SIZE'\?\)"),
        (["DATA.BATCH_SIZE", "many"], [], 2, r"config key DATA.BATCH_SIZE expects int, got str 'many'"),
        ([], ["--batch-szie", "4"], 2, r"unrecognized arguments: --batch-szie 4 \(did you mean --batch-size\?\)"),
        ([], ["--batch-size", "many"], 2, r"argument --batch-size: invalid int value: 'many'"),
    ],
    ids=["unknown-key", "wrong-type-key", "unknown-flag", "wrong-type-flag"],
)
def test_bad_command_line_is_one_line_naming_it(toy_root, tmp_path, capsys, opts, extra, status, message):
    assert _main(tmp_path, toy_root, *extra, opts=opts) == status
    assert re.search(message, _one_error_line(capsys.readouterr().err))
    assert not run_dir(tmp_path).exists()  # nothing written


def test_config_file_with_a_python_tag_is_refused(toy_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"BASE: ['{REPO / 'configs/demo.yaml'}']\nTAG: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    assert _main(tmp_path, toy_root, cfg=str(config)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cannot read config file" in line and "python/object/apply:os.system" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (
            ["DATA.DATASET", "imagenet", "DATA.DATA_PATH", "/nonexistent/imagenet"],
            r"DATA.DATA_PATH /nonexistent/imagenet",
        ),
        (["DATA.DATASET", "imagenet"], r"DATA.DATA_PATH is empty"),
        (["MODEL.FOCAL.EXPAND_SIZES", "[5, 5, 5, 5]"], r"cannot build .*expand size 5 is larger than the window 4"),
        (["MODEL.FOCAL.PATCH_SIZE", "5"], r"cannot build .*DATA.IMG_SIZE 32, MODEL.FOCAL.PATCH_SIZE 5"),
        (["MODEL.NUM_CLASSES", "5"], r"MODEL.NUM_CLASSES is 5 but the dataset has 10 classes"),
    ],
    ids=["missing-data-path", "unset-data-path", "window-too-small", "patch-too-large", "num-classes"],
)
def test_bad_setting_stops_before_training_with_one_line(toy_root, tmp_path, capsys, opts, message):
    assert _main(tmp_path, toy_root, opts=opts) == 1
    assert re.search(message, _one_error_line(capsys.readouterr().out))
    run = run_dir(tmp_path)
    assert not list(run.glob("*.pth")) and not list(run.glob(".*.tmp"))


def test_empty_data_folder_is_named(toy_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _main(tmp_path, toy_root, "--data-path", str(empty), opts=["DATA.DATASET", "imagenet"]) == 1
    assert str(empty / "train") in _one_error_line(capsys.readouterr().out)


def test_checkpoint_of_another_architecture_names_the_mismatches(reference_1, toy_root, tmp_path, capsys):
    last = str(reference_1 / "last.pth")
    assert _main(tmp_path, toy_root, "--eval", "--resume", last, opts=["MODEL.FOCAL.EMBED_DIM", "16"]) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert re.search(r"shape mismatches: \S+ \(8, .*\) vs model \(16, ", line), line


# With a step schedule that multiplies the learning rate by 1e30 after epoch 0, epoch 1's first step
# blows the weights up and its second step has a non-finite loss: deterministic, no test hook needed.
EXPLODING_OPTS = [
    "TRAIN.WARMUP_EPOCHS", "0",
    "TRAIN.LR_SCHEDULER.NAME", "step",
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "1",
    "TRAIN.LR_SCHEDULER.DECAY_RATE", "1e30",
]  # fmt: skip


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(toy_root, tmp_path, capsys):
    assert _main(tmp_path, toy_root, opts=EXPLODING_OPTS) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert re.search(r"NonFiniteLossError: non-finite loss at epoch 1 step \d+", line), line
    run = run_dir(tmp_path)
    assert {p.name for p in run.glob("*.pth")} <= {"best.pth", "last.pth"}  # SAVE_FREQ 5: no periodic file
    assert load_checkpoint_file(str(run / "last.pth"))["epoch"] == 0
    assert [row["epoch"] for row in _rows(run)] == [0]
    assert not list(run.glob(".*.tmp"))


def test_skip_nonfinite_skips_such_steps_and_finishes(toy_root, tmp_path, capsys):
    assert _main(tmp_path, toy_root, opts=[*EXPLODING_OPTS, "TRAIN.SKIP_NONFINITE", "True"]) == 0
    assert re.search(r"skipping step \d+ of epoch 1: non-finite loss", capsys.readouterr().out)
    rows = _rows(run_dir(tmp_path))
    assert rows[0]["skipped_steps"] == 0 and rows[1]["skipped_steps"] > 0


# ----------------------------------------------------------------------------------------------------
# 6. A failing rank ends the whole job
# ----------------------------------------------------------------------------------------------------


def test_job_ends_when_one_rank_fails(toy_root, tmp_path):
    """Rank 1 meets an unreadable image while rank 0 waits for it in a collective: the job ends, quickly."""
    from data.toy import toy_data_path

    args = main_args(tmp_path, toy_root)
    toy = toy_data_path(trainer.get_config(trainer.build_parser().parse_args(args[1:])))  # made if missing
    data = tmp_path / "imagenet"
    shutil.copytree(toy, data)
    images = sorted(p for p in (data / "train").rglob("*") if p.is_file())  # the order of FolderDataset
    first_of_rank_1 = next(iter(DistributedSampler(images, num_replicas=2, rank=1, shuffle=True, seed=0)))
    broken = images[first_of_rank_1]
    broken.write_bytes(b"not an image")

    extra = ["--data-path", str(data), "--dist-timeout", "30"]
    start = time.monotonic()
    result = run_main(main_args(tmp_path, toy_root, *extra, opts=["DATA.DATASET", "imagenet"]), nproc=2, timeout=120)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end"
    assert f"focal: error on rank 1: CorruptImageError: cannot read image {broken}" in output
    assert "ERROR a collective failed, most likely because another rank failed" in output  # rank 0, one line
    assert not re.search(r"\[rank\d\]:\s*Traceback", output)
