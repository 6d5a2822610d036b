"""The README's fine-tune and evaluate workflows run as a user runs them: what is loaded, and what is kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import main_args, run_dir, run_main
from test_config import make_args

from config import ConfigError, get_config

ONE_EPOCH = ["TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0"]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, toy_root) -> Path:
    """A finished one-epoch training run (the 'pretraining')."""
    output = tmp_path_factory.mktemp("pretrain")
    result = run_main(main_args(output, toy_root, opts=ONE_EPOCH))
    assert result.returncode == 0, result.stdout + result.stderr
    return output


def _log(output: Path) -> str:
    return (run_dir(output) / "log_rank0.txt").read_text()


def test_fine_tune_into_the_pretraining_runs_folder_is_refused(pretrained_run, toy_root):
    checkpoint = run_dir(pretrained_run) / "last.pth"
    before = checkpoint.stat().st_mtime_ns
    result = run_main(main_args(pretrained_run, toy_root, "--pretrained", str(checkpoint), opts=ONE_EPOCH))
    assert result.returncode == 1, result.stdout + result.stderr
    error = [line for line in (result.stdout + result.stderr).splitlines() if "--pretrained" in line]
    assert error and "--tag" in error[-1] and "written by a run without --pretrained" in error[-1]
    assert checkpoint.stat().st_mtime_ns == before  # nothing was trained into the old run


def test_fine_tune_loads_pretrained_then_a_rerun_continues_its_own_checkpoints(pretrained_run, toy_root, tmp_path):
    pretrained = run_dir(pretrained_run) / "last.pth"
    ema = ["MODEL_EMA", "True", "MODEL_EMA_DECAY", "1.0", "MODEL_EMA_WARMUP", "False"]  # the EMA keeps its start
    args = main_args(tmp_path, toy_root, "--pretrained", str(pretrained), opts=[*ONE_EPOCH, *ema])
    result = run_main(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"fine-tuning from {pretrained} (weights only)" in _log(tmp_path)
    # The EMA starts from the pretrained weights, not from the random initialisation.
    source = torch.load(pretrained, weights_only=True)["model"]
    ema_weights = torch.load(run_dir(tmp_path) / "last.pth", weights_only=True)["model_ema"]["model"]
    assert all(torch.equal(ema_weights[key], value) for key, value in source.items())

    rerun = run_main(
        main_args(tmp_path, toy_root, "--pretrained", str(pretrained), opts=[*ONE_EPOCH, *ema, "TRAIN.EPOCHS", "2"])
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    log = _log(tmp_path)
    assert "continuing the fine-tune from its checkpoint" in log
    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]


def test_pretrained_and_resume_of_another_run_is_refused(pretrained_run, toy_root, tmp_path):
    checkpoint = str(run_dir(pretrained_run) / "last.pth")
    result = run_main(main_args(tmp_path, toy_root, "--pretrained", checkpoint, "--resume", checkpoint, opts=ONE_EPOCH))
    assert result.returncode == 1
    assert "name two starting points" in result.stdout + result.stderr


def test_eval_keeps_the_runs_config_and_names_what_it_scored(pretrained_run, toy_root):
    run = run_dir(pretrained_run)
    config_before = (run / "config.yaml").read_text()
    checkpoint = run / "last.pth"
    eval_args = main_args(pretrained_run, toy_root, "--eval", "--resume", str(checkpoint), opts=["TRAIN.EPOCHS", "7"])
    for _ in range(2):
        result = run_main(eval_args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert (run / "config.yaml").read_text() == config_before
    latest = json.loads((run / "eval_results.json").read_text())
    assert latest["checkpoint"] == str(checkpoint.resolve()) and latest["ema"] is False
    assert latest["num_images"] == 30  # 10 classes x DATA.TOY_VAL_PER_CLASS 3
    history = [json.loads(line) for line in (run / "eval_results.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[0] == history[1] == latest


def test_rerun_of_a_finished_run_says_there_is_nothing_to_train(pretrained_run, toy_root):
    result = run_main(main_args(pretrained_run, toy_root, opts=ONE_EPOCH))
    assert result.returncode == 0
    assert "nothing to train: the run has done its 1 epochs" in _log(pretrained_run)


def test_cache_mode_without_zip_is_refused():
    with pytest.raises(ConfigError, match="--cache-mode applies to the zip layout only"):
        get_config(make_args("configs/demo.yaml", cache_mode="full"))
    assert get_config(make_args("configs/demo.yaml", cache_mode="full", zip=True)).DATA.CACHE_MODE == "full"


def test_resume_from_weights_only_starts_the_ema_from_those_weights(pretrained_run, toy_root, tmp_path):
    weights = torch.load(run_dir(pretrained_run) / "last.pth", weights_only=True)["model"]
    torch.save({"model": weights}, tmp_path / "weights.pth")  # the released layout: no optimizer, no epoch
    ema = ["MODEL_EMA", "True", "MODEL_EMA_DECAY", "1.0", "MODEL_EMA_WARMUP", "False"]
    result = run_main(main_args(tmp_path, toy_root, "--resume", str(tmp_path / "weights.pth"), opts=[*ONE_EPOCH, *ema]))
    assert result.returncode == 0, result.stdout + result.stderr
    ema_weights = torch.load(run_dir(tmp_path) / "last.pth", weights_only=True)["model_ema"]["model"]
    assert all(torch.equal(ema_weights[key], value) for key, value in weights.items())
