"""--eval reads the validation split alone (folder and zip layouts), and EMA weights survive safetensors conversion.

Runs call ``main.main`` in this process, which is what ``python main.py`` runs (its return value is the exit
status); the checkpoint is the demo model's fresh weights plus a perturbed copy as its EMA, so nothing trains.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from launch import main_args, run_dir

import main as trainer
from config import get_config
from data import FolderDataset, ensure_toy_data
from models import build_model
from tools.convert_checkpoint import main as convert
from utils.checkpoint import load_checkpoint_file

VAL_PER_CLASS = 3


@pytest.fixture(scope="module")
def toy_val(tmp_path_factory) -> Path:
    """The demo's toy validation images (40 px, 3 per class) in the ImageNet folder layout."""
    return ensure_toy_data(tmp_path_factory.mktemp("toy"), 40, 1, VAL_PER_CLASS) / "val"


@pytest.fixture(scope="module")
def val_only_folder(toy_val, tmp_path_factory) -> Path:
    """A dataset root holding val/ and no train/ (how ImageNet is often kept for evaluation)."""
    root = tmp_path_factory.mktemp("val_only_folder")
    shutil.copytree(toy_val, root / "val")
    return root


@pytest.fixture(scope="module")
def val_only_zip(toy_val, tmp_path_factory) -> Path:
    """A dataset root in the released zip layout holding val.zip and val_map.txt only."""
    root = tmp_path_factory.mktemp("val_only_zip")
    folder = FolderDataset(str(toy_val))
    lines = []
    with zipfile.ZipFile(root / "val.zip", "w") as archive:
        for path, label in folder.samples:
            name = str(Path(path).relative_to(toy_val))
            archive.write(path, name)
            lines.append(f"{name}\t{label}\n")
    (root / "val_map.txt").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Demo-model weights with an EMA that differs from them, saved as main.py saves a MODEL_EMA run."""
    args = trainer.build_parser().parse_args(main_args(Path("unused"), Path("unused"))[1:])
    torch.manual_seed(0)
    model = build_model(get_config(args))
    weights = model.state_dict()
    generator = torch.Generator().manual_seed(1)
    ema = {
        key: value + 0.5 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in weights.items()
    }
    path = tmp_path_factory.mktemp("checkpoint") / "ema.pth"
    torch.save({"model": weights, "model_ema": {"model": ema, "num_updates": 5}, "epoch": 0}, path)
    return path


def _evaluate(output: Path, weights: Path, *flags: str, opts: list[str]) -> dict:
    """``main.py --eval --resume weights`` with ``opts``; the written eval_results.json."""
    args = main_args(output, output / "no_toy_data", "--eval", "--resume", str(weights), *flags, opts=opts)
    assert trainer.main(args[1:]) == 0
    return json.loads((run_dir(output) / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def folder_result(val_only_folder, checkpoint, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("eval_folder")
    return _evaluate(output, checkpoint, "--data-path", str(val_only_folder), opts=["DATA.DATASET", "imagenet"])


def test_eval_reads_a_folder_without_train(folder_result):
    """Regression: --eval built the training split too and failed with 'image folder .../train does not exist'."""
    assert folder_result["num_images"] == 10 * VAL_PER_CLASS


@pytest.mark.parametrize("cache_mode", ["part", "full"])
def test_eval_reads_a_zip_layout_without_train_zip(val_only_zip, checkpoint, folder_result, tmp_path, cache_mode):
    """Regression: with --zip, --eval opened (and cached) train.zip just to evaluate."""
    flags = ("--data-path", str(val_only_zip), "--zip", "--cache-mode", cache_mode)
    result = _evaluate(tmp_path, checkpoint, *flags, opts=["DATA.DATASET", "imagenet"])
    assert result == folder_result  # the same images (the zip holds the folder's JPEG files) and weights


def test_converted_checkpoint_keeps_its_ema_weights(val_only_folder, checkpoint, folder_result, tmp_path):
    """Regression: tools/convert_checkpoint.py dropped the EMA weights, so EVAL_EMA on the .safetensors file
    failed with 'trained without MODEL_EMA'."""
    converted = tmp_path / "ema.safetensors"
    assert convert([str(checkpoint), "--output", str(converted)]) == 0
    original, loaded = torch.load(checkpoint, weights_only=True), load_checkpoint_file(str(converted))
    assert loaded["model"].keys() == original["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in original["model"].items())
    assert loaded["model_ema"]["model"].keys() == original["model_ema"]["model"].keys()
    assert all(torch.equal(loaded["model_ema"]["model"][k], v) for k, v in original["model_ema"]["model"].items())

    data = ("--data-path", str(val_only_folder))
    opts = ["DATA.DATASET", "imagenet", "EVAL_EMA", "True"]
    ema_pth = _evaluate(tmp_path / "pth", checkpoint, *data, opts=opts)
    ema_converted = _evaluate(tmp_path / "converted", converted, *data, opts=opts)
    plain_converted = _evaluate(tmp_path / "plain", converted, *data, opts=["DATA.DATASET", "imagenet"])
    scores = ("acc1", "acc5", "loss", "num_images")
    assert [ema_converted[key] for key in scores] == [ema_pth[key] for key in scores]
    assert [plain_converted[key] for key in scores] == [folder_result[key] for key in scores]
    assert ema_converted["ema"] and ema_converted["loss"] != plain_converted["loss"]  # the EMA weights were scored
