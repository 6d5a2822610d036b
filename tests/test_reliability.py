"""Reliability of main.py: bit-exact resume after a kill or a stop signal (SIGTERM, Ctrl-C), atomic and safe
checkpoints, one-line errors for bad input, a job that ends when one rank fails, and a torchrun job that survives
a lost worker.

Runs that must be real processes (killed, signalled, torchrun) start main.py as users do; error checks
call ``main.main`` in this process, which is what ``python main.py`` runs (its return value is the exit
status), to keep this file fast on a small CPU machine.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import multiprocessing
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
import torch.distributed as dist
from launch import REPO, _env, main_args, run_dir, run_main
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import main as trainer
from data.resumable import EpochSeededDataset, ResumableSampler
from utils.checkpoint import CheckpointManager, load_checkpoint_file
from utils.distributed import StopRequest, _generation

# Batch 2: 40 steps per epoch on one process, 20 per rank on two, so a signal lands mid-epoch.
RESUME_OPTS = ["DATA.BATCH_SIZE", "2", "SAVE_FREQ", "1"]
STEPS_1, STEPS_2 = 40, 20
TIMING_KEYS = {"epoch_time", "images_per_s"}


class Run:
    """main.py started in the background (alone or under torchrun), its output collected line by line.

    ``launcher_args`` go to torchrun (e.g. ``--max-restarts``). stdout is read as it comes; stderr apart
    (``errors``), so a test can tell what reached it.
    """

    def __init__(self, args: list[str], nproc: int = 1, launcher_args: tuple[str, ...] = ()) -> None:
        prefix = [sys.executable]
        if nproc > 1:
            prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher_args]
        self.proc = subprocess.Popen(
            [*prefix, *args],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so a kill can take the workers too
        )
        self.nproc = nproc
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._error_reader = threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True)
        self._error_reader.start()

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
                self._queue.put(None)  # for finish()
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        self.kill()
        pytest.fail(f"no line matching {pattern!r}:\n" + "".join(self.lines[-40:] + self.errors[-40:]))

    def worker_pids(self) -> dict[int, int]:
        """The process id of main.py on each rank (under torchrun: the agent's children, by their RANK)."""
        if self.nproc == 1:
            return {0: self.proc.pid}
        pids = {}
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            ranks = [int(entry[len(b"RANK=") :]) for entry in environ if entry.startswith(b"RANK=")]
            if ranks:
                pids[ranks[0]] = int(child)
        return pids

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
        """(exit status, all output: stdout, then stderr) once the run has ended."""
        self.proc.wait(timeout=timeout)
        try:
            while (line := self._queue.get(timeout=10)) is not None:
                self.lines.append(line)
        except queue.Empty:
            pytest.fail("the run's output is still open 10 s after it ended: one of its processes was left behind")
        self._error_reader.join(timeout=10)
        return self.proc.returncode, "".join(self.lines + self.errors)


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


def _interrupt_twice_and_finish(output: Path, toy_root: Path, nproc: int, steps: int) -> None:
    """Kill a run after its epoch-0 checkpoint, resume it and stop it with SIGTERM mid-epoch 1, resume again.

    The resumed parts load with a loader worker. The SIGTERM goes to each rank's process group, loader
    worker included, as torchrun forwards it and SLURM sends it; it is sent to the workers rather than to
    torchrun, whose own exit status after a signal is 1 whatever its workers did: torchrun exits 0 only when
    every worker did, so every process's exit status is checked.
    """
    args = main_args(output, toy_root, opts=RESUME_OPTS)
    first = Run(args, nproc)
    first.wait_for(r"saved epoch 0 checkpoint")
    first.kill()

    resumed_args = main_args(output, toy_root, opts=[*RESUME_OPTS, "DATA.NUM_WORKERS", "1"])
    second = Run(resumed_args, nproc)
    second.wait_for(r"resumed from .*last\.pth: starting at epoch 1$")
    second.wait_for(rf"Train: \[1/2\]\[0/{steps}\]")
    for pid in second.worker_pids().values():
        os.killpg(pid, signal.SIGTERM)
    status, out = second.finish()
    assert status == 0, out[-3000:]
    stopped = re.search(r"stopped on request \(SIGTERM\) at epoch 1 step (\d+)", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < steps
    for rank in range(1, nproc):
        log = (run_dir(output) / f"log_rank{rank}.txt").read_text()
        assert f"stopped on request (SIGTERM) at epoch 1 step {step}" in log

    third = run_main(args, nproc=nproc)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"starting at epoch 1 step {step}" in third.stdout


def test_killed_and_stopped_run_resumes_bit_exactly_on_one_process(reference_1, toy_root, tmp_path):
    # The resumed parts load with a worker process: augmentation must not depend on who loads a sample.
    _interrupt_twice_and_finish(tmp_path, toy_root, 1, STEPS_1)
    assert_same_result(run_dir(tmp_path), reference_1)


def test_killed_and_stopped_torchrun_job_resumes_bit_exactly_on_two_processes(reference_2, toy_root, tmp_path):
    _interrupt_twice_and_finish(tmp_path, toy_root, 2, STEPS_2)
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


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_a_short_stderr(toy_root, tmp_path):
    """SIGINT to the process group, as Ctrl-C in a terminal sends it (the loader worker gets it too)."""
    run = Run(main_args(tmp_path, toy_root, opts=[*RESUME_OPTS, "DATA.NUM_WORKERS", "1"]))
    run.wait_for(rf"Train: \[1/2\]\[3/{STEPS_1}\]")
    os.killpg(run.proc.pid, signal.SIGINT)
    status, out = run.finish()
    assert status == 0, out[-3000:]
    stopped = re.search(rf"stopped on request \(SIGINT\) at epoch 1 step (\d+) of {STEPS_1}; checkpoint saved", out)
    assert stopped, out[-3000:]
    checkpoint = load_checkpoint_file(str(run_dir(tmp_path) / "last.pth"))
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["epoch_done"]) == (1, int(stopped.group(1)), False)
    assert "Traceback" not in out and len(run.errors) <= 2, "".join(run.errors)


def test_a_second_ctrl_c_aborts_at_once_with_one_line(toy_root, tmp_path, capsys, monkeypatch):
    with StopRequest() as stop:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C raised KeyboardInterrupt instead of asking for a stop")
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run", interrupted)
    try:
        status = _main(tmp_path, toy_root)
    except KeyboardInterrupt:
        pytest.fail("main() let the KeyboardInterrupt through (a traceback)")
    assert status == 130
    assert "ERROR interrupted by a second Ctrl-C" in _one_error_line(capsys.readouterr().out)


class _SlowPids(Dataset):
    """Each item is the id of the process that loaded it, 0.1 s after being asked."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> int:
        time.sleep(0.1)
        return os.getpid()


def test_loader_workers_outlive_stop_signals_sent_to_the_whole_job():
    """torchrun, a terminal and SLURM signal every process of a rank, not just main.py: the loader worker must
    keep serving (PyTorch's workers die of a SIGTERM their parent did not send, which ended the run)."""
    with StopRequest() as stop:
        batches = iter(DataLoader(_SlowPids(), batch_size=1, num_workers=1))
        worker = int(next(batches))
        subprocess.run(["sh", "-c", f"kill -INT {worker}; kill -USR1 {worker}; kill -TERM {worker}"], check=True)
        assert [int(pid) for pid in batches] == [worker] * 7
        assert not stop()  # the signals went to the worker only


def test_a_process_forked_during_training_still_ends_on_its_parents_sigterm():
    """How the main process ends a stuck loader worker (and multiprocessing its children at exit)."""
    with StopRequest():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        child.start()
    child.terminate()
    child.join(timeout=10)
    assert child.exitcode == 0


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


# A 4.9M-parameter model on 2 batches of 10 per epoch: its checkpoint (about 60 MB with the AdamW moments) takes
# a visible time to write. SAVE_FREQ 5: every save rewrites last.pth (and best.pth), no periodic file.
LARGE_OPTS = [
    "MODEL.FOCAL.EMBED_DIM", "64",
    "MODEL.FOCAL.NUM_HEADS", "[2, 4, 8, 16]",
    "DATA.TOY_TRAIN_PER_CLASS", "2",
    "DATA.BATCH_SIZE", "10",
    "TRAIN.EPOCHS", "3",
    "SAVE_FREQ", "5",
]  # fmt: skip


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one_and_the_run_resumes_from_it(toy_root, tmp_path):
    """SIGKILL as soon as the epoch-1 save starts writing (a temporary file appears, or last.pth changes)."""
    args = main_args(tmp_path, toy_root, opts=LARGE_OPTS)
    run = Run(args)
    run.wait_for(r"saved epoch 0 checkpoint to (best\.pth, )?last\.pth$")
    folder = run_dir(tmp_path)
    last = folder / "last.pth"
    saved = last.stat()
    deadline = time.monotonic() + 120
    while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
        now = last.stat()
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (saved.st_ino, saved.st_size, saved.st_mtime_ns):
            break  # written in place
        time.sleep(0.002)
    run.kill()
    assert load_checkpoint_file(str(last))["epoch"] == 0  # the previous checkpoint, whole

    result = run_main(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(
        r"WARNING removing \.(best|last)\.pth\.[0-9a-f]{32}\.tmp, left by an interrupted save", result.stdout
    )
    assert re.search(r"resumed from \S*last\.pth: starting at epoch 1$", result.stdout, re.MULTILINE)
    assert not list(folder.glob(".*.tmp"))
    assert load_checkpoint_file(str(last))["epoch"] == 2


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


def test_resume_from_a_folder_is_one_line_naming_it(toy_root, tmp_path, capsys):
    assert _main(tmp_path, toy_root, "--resume", str(tmp_path)) == 1
    line = _one_error_line(capsys.readouterr().out)
    assert f"checkpoint {tmp_path} is a directory; pass a checkpoint file" in line


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


# ----------------------------------------------------------------------------------------------------
# 8. A lost worker under torchrun --max-restarts
# ----------------------------------------------------------------------------------------------------


def _start(server: dist.TCPStore, delays: tuple[float, float]) -> list[int]:
    """The generation each of 2 ranks gets, rank r arriving after ``delays[r]`` seconds, in ``server``'s store."""
    timeout = datetime.timedelta(seconds=10)
    generations = [0, 0]

    def rank(r: int) -> None:
        time.sleep(delays[r])
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
        generations[r] = _generation(client, r, 2, timeout)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return generations


def test_restarted_ranks_agree_on_keys_no_earlier_start_wrote():
    """torchrun's agent keeps one store across restarts: whichever rank of a new start arrives first, the ranks
    agree on a generation (their process group's key prefix) that is new, never one an earlier start left."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    first = _start(server, (0.0, 0.0))
    rank_1_first = _start(server, (0.5, 0.0))  # finds rank 0's answer and generation of the first start
    rank_0_first = _start(server, (0.0, 0.5))  # finds rank 1's nonce of the start before
    assert first[0] == first[1] < rank_1_first[0] == rank_1_first[1] < rank_0_first[0] == rank_0_first[1]


def _live_members(group: int) -> list[int]:
    """The processes of process group ``group`` that are still running (zombies left out)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def test_torchrun_restart_after_a_killed_worker_ends_like_an_uninterrupted_job(reference_2, toy_root, tmp_path):
    """``torchrun --max-restarts 1``; rank 1 SIGKILLed mid-epoch 1 (an OOM kill, a bad node): the job exits 0.

    The killed rank's loader workers die with it (they hold copies of its sockets: alive, they hid its death
    from rank 0 for up to 5 s). The survivor's next collective fails at once: it exits in one line, no
    traceback, although torchrun's SIGTERM also reaches its loader workers, and nothing waits for
    --dist-timeout or torchrun's SIGKILL. The restarted workers form a new process group in the store the dead
    ones used and resume from the epoch-0 checkpoint; the final weights are the uninterrupted run's, bit for bit.
    """
    args = main_args(tmp_path, toy_root, opts=[*RESUME_OPTS, "DATA.NUM_WORKERS", "1"])
    job = Run(args, nproc=2, launcher_args=("--max-restarts", "1"))
    job.wait_for(rf"Train: \[1/2\]\[5/{STEPS_2}\]")
    pids = job.worker_pids()
    assert len(_live_members(pids[1])) >= 2  # rank 1 and its loader workers
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    while _live_members(pids[1]) and time.monotonic() - killed < 10:
        time.sleep(0.02)
    orphans_seconds = time.monotonic() - killed
    while Path(f"/proc/{pids[0]}").exists() and time.monotonic() - killed < 60:
        time.sleep(0.02)
    stop_seconds = time.monotonic() - killed
    job.wait_for(r"resumed from \S*last\.pth: starting at epoch 1$")
    status, out = job.finish()
    assert status == 0, out[-3000:]
    assert orphans_seconds < 2, f"the killed worker's loader workers outlived it by {orphans_seconds:.1f} s"
    assert stop_seconds < 5, f"the surviving worker took {stop_seconds:.1f} s to exit"
    assert "a collective failed, most likely because another rank failed" in out  # the survivor's one line
    assert not re.search(r"\[rank0\]:\s*Traceback", out) and "Unable to shutdown process" not in out
    assert_same_result(run_dir(tmp_path), reference_2)
