"""End-to-end runs of main.py: torchrun training, auto-resume, exact evaluation, released checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from golden import fixture_paths, load_fixture
from launch import main_args, run_dir, run_main, run_two_nodes
from test_reliability import Run, assert_same_result

from lr_scheduler import LRSchedule


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, toy_root) -> Path:
    """A 2-process torchrun run of the demo config for 2 epochs."""
    output = tmp_path_factory.mktemp("run")
    result = run_main(main_args(output, toy_root), nproc=2)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir(output)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_training_writes_checkpoints_metrics_and_events(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "last.pth").is_file() and (trained_run / "best.pth").is_file()
    assert {"log_rank0.txt", "log_rank1.txt"} <= {p.name for p in trained_run.iterdir()}
    rows = _metrics(trained_run)
    assert [row["epoch"] for row in rows] == [0, 1]
    for key in ("train_loss", "lr", "acc1", "acc5", "max_acc1", "epoch_time", "images_per_s"):
        assert key in rows[-1], key
    assert list((trained_run / "tb").glob("events.out.tfevents.*"))


def test_auto_resume_continues_from_last_checkpoint(trained_run, toy_root, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(trained_run, run_dir(output))
    result = run_main(main_args(output, toy_root, opts=["TRAIN.EPOCHS", "3"]), nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (run_dir(output) / "log_rank0.txt").read_text()
    assert "auto-resuming from" in log and "starting at epoch 2" in log
    assert [row["epoch"] for row in _metrics(run_dir(output))] == [0, 1, 2]


@pytest.mark.parametrize("auto_resume", [True, False])
def test_rerun_naming_resume_continues_the_run_unless_auto_resume_is_off(trained_run, toy_root, tmp_path, auto_resume):
    """A rerun of a command with --resume continues from the run's own newest checkpoint (the released trainer's
    rule), so a preempted job loses nothing; TRAIN.AUTO_RESUME False makes --resume win."""
    output = tmp_path / "out"
    shutil.copytree(trained_run, run_dir(output))
    first_epoch = tmp_path / "epoch0.pth"
    checkpoint = torch.load(trained_run / "last.pth", weights_only=False)
    torch.save({**checkpoint, "epoch": 0, "epoch_done": True}, first_epoch)  # as if written after epoch 0
    opts = ["TRAIN.EPOCHS", "3", "TRAIN.AUTO_RESUME", str(auto_resume)]
    result = run_main(main_args(output, toy_root, "--resume", str(first_epoch), opts=opts), nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (run_dir(output) / "log_rank0.txt").read_text()
    if auto_resume:
        assert f"instead of MODEL.RESUME {first_epoch}" in log and "starting at epoch 2" in log
    else:
        assert f"resumed from {first_epoch}: starting at epoch 1" in log


def _evaluate(checkpoint: Path, toy_root: Path, output: Path, nproc: int, *extra: str, opts=None) -> dict:
    args = main_args(output, toy_root, "--eval", "--resume", str(checkpoint), *extra, opts=opts)
    result = run_main(args, nproc=nproc)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((run_dir(output) / "eval_results.json").read_text())


def test_eval_gives_identical_accuracy_with_one_and_two_processes(trained_run, toy_root, tmp_path):
    one = _evaluate(trained_run / "last.pth", toy_root, tmp_path / "one", nproc=1)
    two = _evaluate(trained_run / "last.pth", toy_root, tmp_path / "two", nproc=2)
    assert one["num_images"] == two["num_images"] == 30
    assert one["acc1"] == two["acc1"] and one["acc5"] == two["acc5"]


def _fixture_opts(kwargs: dict) -> list[str]:
    """--opts that rebuild a golden fixture's architecture from the config."""
    keys = {
        "embed_dim": "EMBED_DIM", "depths": "DEPTHS", "num_heads": "NUM_HEADS", "window_size": "WINDOW_SIZE",
        "patch_size": "PATCH_SIZE", "focal_levels": "FOCAL_LEVELS", "focal_windows": "FOCAL_WINDOWS",
        "expand_sizes": "EXPAND_SIZES", "focal_pool": "FOCAL_POOL", "use_shift": "USE_SHIFT",
        "expand_layer": "EXPAND_LAYER", "use_conv_embed": "USE_CONV_EMBED", "ape": "APE",
    }  # fmt: skip
    opts = ["DATA.IMG_SIZE", str(kwargs["img_size"]), "MODEL.NUM_CLASSES", str(kwargs["num_classes"])]
    for name, key in keys.items():
        value = kwargs[name]
        opts += [f"MODEL.FOCAL.{key}", json.dumps(value) if not isinstance(value, str) else value]
    return opts


def test_released_layout_checkpoint_evaluates(toy_root, tmp_path):
    fixture = load_fixture(fixture_paths("golden")[0])  # released state_dict, derived buffers included
    checkpoint = tmp_path / "released.pth"
    torch.save({"model": fixture["state_dict"]}, checkpoint)
    opts = _fixture_opts(fixture["kwargs"])
    result = _evaluate(checkpoint, toy_root, tmp_path / "eval", 1, opts=opts)
    assert result["num_images"] == 30 and 0.0 <= result["acc1"] <= 100.0


def test_checkpoint_of_another_architecture_is_refused(trained_run, toy_root, tmp_path):
    args = main_args(
        tmp_path, toy_root, "--eval", "--resume", str(trained_run / "last.pth"), opts=["MODEL.FOCAL.EMBED_DIM", "16"]
    )
    result = run_main(args, nproc=1)
    assert result.returncode != 0
    assert "shape mismatches" in result.stdout + result.stderr


def test_zip_layout_evaluates_like_the_folder_layout(trained_run, toy_root, tmp_path):
    folder = next(p for p in toy_root.iterdir() if (p / "val").is_dir())
    zipped = tmp_path / "zipdata"
    zipped.mkdir()
    for split in ("train", "val"):
        classes = sorted(p.name for p in (folder / split).iterdir())
        lines = []
        with zipfile.ZipFile(zipped / f"{split}.zip", "w") as archive:
            for label, name in enumerate(classes):
                for image in sorted((folder / split / name).iterdir()):
                    archive.write(image, f"{name}/{image.name}")
                    lines.append(f"{name}/{image.name}\t{label}")
        (zipped / f"{split}_map.txt").write_text("\n".join(lines) + "\n")
    folder_result = _evaluate(trained_run / "last.pth", toy_root, tmp_path / "f", 1)
    zip_opts = ["DATA.DATASET", "imagenet"]
    zip_result = _evaluate(
        trained_run / "last.pth", toy_root, tmp_path / "z", 1, "--zip", "--data-path", str(zipped), opts=zip_opts
    )
    assert zip_result == folder_result


def test_two_node_torchrun_trains(toy_root, tmp_path):
    results = run_two_nodes(main_args(tmp_path, toy_root, opts=["TRAIN.EPOCHS", "1"]))
    for result in results:
        assert result.returncode == 0, result.stdout
    assert [row["epoch"] for row in _metrics(run_dir(tmp_path))] == [0]


def test_demo_pipeline_learns_well_above_chance(tmp_path):
    """The demo recipe (augmentations, Mixup/CutMix, AdamW, warmup + cosine) learns the toy classes quickly."""
    opts = ["DATA.TOY_TRAIN_PER_CLASS", "150", "DATA.TOY_VAL_PER_CLASS", "10", "DATA.TOY_ROOT", str(tmp_path / "toy"),
            "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "DATA.NUM_WORKERS", "1"]  # fmt: skip
    args = ["main.py", "--cfg", "configs/demo.yaml", "--output", str(tmp_path), "--opts", *opts]
    result = run_main(args, nproc=1, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = _metrics(run_dir(tmp_path))
    assert rows[-1]["max_acc1"] >= 50.0  # chance 10%; SEED 0-5 reach 57-65% (58 at 0), a 10x smaller LR 41%
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] or rows[-1]["acc1"] > rows[0]["acc1"]


def test_model_ema_is_evaluated_checkpointed_and_evaluable(toy_root, tmp_path):
    opts = ["MODEL_EMA", "True", "MODEL_EMA_DECAY", "0.9", "TRAIN.EPOCHS", "1"]
    result = run_main(main_args(tmp_path / "train", toy_root, opts=opts), nproc=1)
    assert result.returncode == 0, result.stdout + result.stderr
    run = run_dir(tmp_path / "train")
    row = _metrics(run)[-1]
    assert {"acc1_ema", "acc5_ema", "loss_ema"} <= set(row)
    checkpoint = torch.load(run / "last.pth", weights_only=True)
    assert checkpoint["model_ema"]["num_updates"] > 0
    assert any(
        not torch.equal(value, checkpoint["model"][key])
        for key, value in checkpoint["model_ema"]["model"].items()
        if value.is_floating_point()
    )
    evaluated = _evaluate(run / "last.pth", toy_root, tmp_path / "eval", 1, opts=["EVAL_EMA", "True"])
    assert evaluated["acc1"] == pytest.approx(row["acc1_ema"])


# ---- epoch statistics: the job's throughput, the rate each step used, evaluation progress, accumulation ----------


def test_images_per_s_is_the_whole_jobs_rate(trained_run):
    """Two processes, each 2 full batches of 16 per epoch (40 images per rank, drop_last): the rate counts 64."""
    for row in _metrics(trained_run):
        assert row["images_per_s"] * row["epoch_time"] == pytest.approx(2 * 2 * 16)
    log = (trained_run / "log_rank0.txt").read_text()
    assert re.search(r"Train: epoch 1 took \S+: [\d.]+ images/s \(2 processes, [\d.]+ each\)", log)


def test_logged_learning_rates_are_the_ones_the_steps_used(trained_run):
    """metrics.jsonl's lr is the epoch's last step's rate (not min_lr, which no step used); step 0 logs warmup_lr."""
    scheduler = torch.load(trained_run / "last.pth", weights_only=True)["lr_scheduler"]
    schedule, steps = LRSchedule(**scheduler["schedule"]), scheduler["step"]
    rows = _metrics(trained_run)
    assert rows[-1]["lr"] == schedule.lr_at(steps - 1) != schedule.min_lr
    assert rows[0]["lr"] == schedule.lr_at(steps // 2 - 1)
    log = (trained_run / "log_rank0.txt").read_text()
    assert re.search(r"Train: \[0/2\]\[0/\d+\]\teta \S+ lr (\S+)", log).group(1) == f"{schedule.warmup_lr:.6f}"


def test_evaluation_progress_is_logged_by_rank_0(trained_run):
    """30 validation images, 15 per rank in one batch: rank 0 logs its batch count, rate, ETA and running top-1."""
    log = (trained_run / "log_rank0.txt").read_text()
    progress = r"Test: \[1/1\]\teta 0:00:00\t[\d.]+ images/s per process\tacc1 [\d.]+ over rank 0's 15 images so far"
    assert len(re.findall(progress, log)) == 2  # once per epoch
    assert "Test: [" not in (trained_run / "log_rank1.txt").read_text()


# Batch 2 on one process: 40 batches per epoch, so accumulation 3 makes 13 steps of 3 and one of the last batch.
ACCUMULATION_OPTS = ["DATA.BATCH_SIZE", "2", "SAVE_FREQ", "1", "TRAIN.ACCUMULATION_STEPS", "3"]


@pytest.fixture(scope="module")
def accumulation_run(tmp_path_factory, toy_root) -> Path:
    """An uninterrupted 2-epoch run on one process with accumulation 3 over 40 batches per epoch."""
    output = tmp_path_factory.mktemp("accumulation")
    result = run_main(main_args(output, toy_root, opts=ACCUMULATION_OPTS))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir(output)


def test_accumulation_that_does_not_divide_the_epoch_steps_on_the_remainder(accumulation_run):
    """14 optimizer steps per epoch (ceil(40 / 3)) in the schedule and in global_step, with a warning saying so."""
    checkpoint = torch.load(accumulation_run / "last.pth", weights_only=True)
    schedule = checkpoint["lr_scheduler"]["schedule"]
    assert checkpoint["global_step"] == checkpoint["lr_scheduler"]["step"] == 2 * 14
    assert (schedule["warmup_steps"], schedule["total_steps"]) == (14, 2 * 14)
    log = (accumulation_run / "log_rank0.txt").read_text()
    assert (
        "WARNING TRAIN.ACCUMULATION_STEPS 3 does not divide the 40 batches of an epoch: the last of its 14 optimizer "
        "steps accumulates the remaining 1"
    ) in log
    assert _metrics(accumulation_run)[-1]["lr"] == LRSchedule(**schedule).lr_at(2 * 14 - 1)


def test_killed_and_stopped_run_with_accumulation_remainder_resumes_bit_exactly(accumulation_run, toy_root, tmp_path):
    """Killed after epoch 0, stopped by SIGTERM in epoch 1 (after a whole group), resumed: the uninterrupted result."""
    args = main_args(tmp_path, toy_root, opts=ACCUMULATION_OPTS)
    first = Run(args)
    first.wait_for(r"saved epoch 0 checkpoint")
    first.kill()
    second = Run(args)
    second.wait_for(r"resumed from .*last\.pth: starting at epoch 1$")
    second.wait_for(r"Train: \[1/2\]\[0/40\]")
    second.proc.send_signal(signal.SIGTERM)
    status, out = second.finish()
    stopped = re.search(r"stopped on request \(SIGTERM\) at epoch 1 step (\d+)", out)
    assert status == 0 and stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < 40 and step % 3 == 0
    third = run_main(args)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"starting at epoch 1 step {step}" in third.stdout
    assert_same_result(run_dir(tmp_path), accumulation_run)
