"""Distributed evaluation counts every image exactly once: a validation set that no number of processes splits
evenly gives the same top-1/top-5 and the folder's image count with 1, 2 and 3 processes (a sampler that pads,
like ``DistributedSampler`` or timm's, repeats images; one that drops the remainder loses some)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from launch import main_args, run_dir, run_main

from data.toy import ensure_toy_data

NUM_VAL_IMAGES = 29  # prime: 2 and 3 processes both get uneven shares


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny toy set of tests/launch.py's TINY_OPTS (8 train, 3 val images per class) in the ImageNet folder
    layout, with val/ cut from 30 to NUM_VAL_IMAGES images."""
    toy = ensure_toy_data(tmp_path_factory.mktemp("toy"), image_size=40, train_per_class=8, val_per_class=3)
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        shutil.copytree(toy / split, root / split)
    val_images = sorted((root / "val").rglob("*.JPEG"))
    for image in val_images[NUM_VAL_IMAGES:]:  # from the last class, which keeps 2
        image.unlink()
    assert len(list((root / "val").rglob("*.JPEG"))) == NUM_VAL_IMAGES
    return root


def _args(output: Path, data: Path, *extra: str, opts: tuple[str, ...] = ()) -> list[str]:
    """main.py's arguments for tests/launch.py's tiny demo run, on the folder set ``data``."""
    return main_args(output, data, "--data-path", str(data), *extra, opts=["DATA.DATASET", "imagenet", *opts])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, folder_set: Path) -> Path:
    """One epoch of training on the folder set: a model whose predictions differ from image to image."""
    output = tmp_path_factory.mktemp("train")
    result = run_main(_args(output, folder_set, opts=("TRAIN.EPOCHS", "1")))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir(output) / "last.pth"


def test_eval_counts_every_image_once_whatever_the_number_of_processes(checkpoint, folder_set, tmp_path):
    results = {}
    for nproc in (1, 2, 3):
        output = tmp_path / f"eval{nproc}"
        result = run_main(_args(output, folder_set, "--eval", "--resume", str(checkpoint)), nproc=nproc)
        assert result.returncode == 0, result.stdout + result.stderr
        results[nproc] = json.loads((run_dir(output) / "eval_results.json").read_text())
    assert {n: r["num_images"] for n, r in results.items()} == {1: NUM_VAL_IMAGES, 2: NUM_VAL_IMAGES, 3: NUM_VAL_IMAGES}
    assert results[1]["acc1"] == results[2]["acc1"] == results[3]["acc1"]
    assert results[1]["acc5"] == results[2]["acc5"] == results[3]["acc5"]
    assert results[2]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    assert results[3]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
