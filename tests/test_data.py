"""Tests of the data package: toy set, folder and zip layouts, checks, transforms, samplers, loaders."""

from __future__ import annotations

import multiprocessing
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

from config import get_default_config
from data import (
    TOY_CLASSES,
    CorruptImageError,
    FolderDataset,
    ShardedEvalSampler,
    ShardedTrainSampler,
    ZipDataset,
    build_dataset,
    build_loader,
    build_mixup,
    build_transform,
    ensure_toy_data,
    seed_worker,
)
from data.toy import toy_dataset_dir

TOY_SIZE = 16
TOY_TRAIN = 3
TOY_VAL = 2


def _toy(root: Path) -> Path:
    return ensure_toy_data(root, TOY_SIZE, TOY_TRAIN, TOY_VAL)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy set (16 px, 3 train and 2 val images per class) shared by the tests of this file."""
    return _toy(tmp_path_factory.mktemp("toy"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _config(**data: object):
    """Default config with small, CPU-friendly settings plus ``DATA`` overrides."""
    cfg = get_default_config()
    cfg.defrost()
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.BATCH_SIZE = 4
    cfg.DATA.IMG_SIZE = 16
    cfg.MODEL.NUM_CLASSES = len(TOY_CLASSES)
    for key, value in data.items():
        cfg.DATA[key] = value
    return cfg


def _save_image(path: Path, mode: str = "RGB", size: int = 12, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)


def _make_folder_set(root: Path, train: list[str], val: list[str]) -> Path:
    """An ImageNet-layout set with two JPEGs per class folder."""
    for split, classes in (("train", train), ("val", val)):
        for name in classes:
            for i in range(2):
                _save_image(root / split / name / f"{name}_{i}.JPEG")
    return root


def _zip_split(folder: FolderDataset, dest: Path, split: str) -> None:
    """Write ``folder`` in the released zip layout: ``<split>.zip`` plus ``<split>_map.txt``."""
    lines = []
    with zipfile.ZipFile(dest / f"{split}.zip", "w") as archive:
        for path, label in folder.samples:
            name = str(Path(path).relative_to(folder.root))
            archive.write(path, name)
            lines.append(f"{name}\t{label}\n")
    (dest / f"{split}_map.txt").write_text("".join(lines))


@pytest.fixture(scope="module")
def zip_dir(toy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy set converted to the zip layout."""
    dest = tmp_path_factory.mktemp("zip")
    for split in ("train", "val"):
        _zip_split(FolderDataset(str(toy_dir / split)), dest, split)
    return dest


# ----------------------------------------------------------------------------- toy data


def test_toy_layout_and_counts(toy_dir: Path) -> None:
    assert (toy_dir / "COMPLETE").is_file()
    for split, per_class in (("train", TOY_TRAIN), ("val", TOY_VAL)):
        classes = sorted(p.name for p in (toy_dir / split).iterdir())
        assert classes == sorted(TOY_CLASSES)
        for name in classes:
            images = sorted((toy_dir / split / name).glob("*.JPEG"))
            assert len(images) == per_class
            assert Image.open(images[0]).size == (TOY_SIZE, TOY_SIZE)


def test_toy_generation_is_deterministic(toy_dir: Path, tmp_path: Path) -> None:
    assert _files(_toy(tmp_path)) == _files(toy_dir)


def test_toy_generation_is_reused_once_complete(toy_dir: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in toy_dir.rglob("*")}
    assert _toy(toy_dir.parent) == toy_dir
    assert {p: p.stat().st_mtime_ns for p in toy_dir.rglob("*")} == before


def _generate_after(barrier: multiprocessing.synchronize.Barrier, root: Path) -> None:
    barrier.wait()
    _toy(root)


def test_toy_generation_by_concurrent_processes(toy_dir: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_generate_after, args=(barrier, tmp_path)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    final = toy_dataset_dir(tmp_path, TOY_SIZE, TOY_TRAIN, TOY_VAL)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary folder or lock left
    assert _files(final) == _files(toy_dir)


def test_toy_incomplete_folder_is_an_error(tmp_path: Path) -> None:
    toy_dataset_dir(tmp_path, TOY_SIZE, TOY_TRAIN, TOY_VAL).mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        _toy(tmp_path)


def test_build_loader_on_toy_data(toy_dir: Path) -> None:
    bundle = build_loader(_config(DATASET="toy", TOY_ROOT=str(toy_dir.parent), TOY_IMAGE_SIZE=TOY_SIZE,
                                  TOY_TRAIN_PER_CLASS=TOY_TRAIN, TOY_VAL_PER_CLASS=TOY_VAL), 0, 1)
    assert bundle.num_classes == len(TOY_CLASSES)
    assert isinstance(bundle.sampler_train, DistributedSampler)
    images, targets = next(iter(bundle.loader_train))
    assert images.shape == (4, 3, 16, 16)
    assert len(bundle.loader_train) == len(TOY_CLASSES) * TOY_TRAIN // 4  # drop_last
    assert sum(len(y) for _, y in bundle.loader_val) == len(TOY_CLASSES) * TOY_VAL  # nothing dropped
    mixed, soft = bundle.mixup_fn(images, targets)
    assert soft.shape == (4, len(TOY_CLASSES))


# ----------------------------------------------------------------------------- folder and zip layouts


def _pixels(dataset: FolderDataset | ZipDataset) -> list[np.ndarray]:
    return [np.asarray(dataset.load_rgb(i)) for i in range(len(dataset))]


@pytest.mark.parametrize("cache_mode", ["no", "part", "full"])
def test_zip_layout_matches_folder_layout(toy_dir: Path, zip_dir: Path, cache_mode: str) -> None:
    folder = FolderDataset(str(toy_dir / "train"))
    archive = ZipDataset(str(zip_dir / "train.zip"), str(zip_dir / "train_map.txt"), cache_mode=cache_mode)
    assert [name for name, _ in archive.samples] == [str(Path(p).relative_to(folder.root)) for p, _ in folder.samples]
    assert archive.targets == folder.targets
    assert archive.num_classes == folder.num_classes == len(TOY_CLASSES)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(archive), _pixels(folder)))


@pytest.mark.parametrize(("cache_mode", "expected"), [("no", []), ("part", [1, 3, 5]), ("full", list(range(7)))])
def test_zip_cache_modes_hold_the_right_images(tmp_path: Path, cache_mode: str, expected: list[int]) -> None:
    names = [f"c/{i}.png" for i in range(7)]
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as archive:
        for name in names:
            _save_image(tmp_path / name, fmt="PNG")
            archive.write(tmp_path / name, name)
    (tmp_path / "train_map.txt").write_text("".join(f"{name}\t0\n" for name in names))
    dataset = ZipDataset(str(tmp_path / "train.zip"), str(tmp_path / "train_map.txt"), cache_mode=cache_mode,
                         rank=1, world_size=2)
    assert dataset.cached_indices == expected


def test_zip_reads_in_forked_workers_after_the_parent_read(zip_dir: Path) -> None:
    dataset = ZipDataset(str(zip_dir / "val.zip"), str(zip_dir / "val_map.txt"), transforms.PILToTensor())
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])  # the parent opens its own handle
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)


def test_zip_unknown_cache_mode_is_an_error(zip_dir: Path) -> None:
    with pytest.raises(ValueError, match="DATA.CACHE_MODE"):
        ZipDataset(str(zip_dir / "val.zip"), str(zip_dir / "val_map.txt"), cache_mode="some")


def test_zip_malformed_map_line_is_an_error(zip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "val_map.txt").write_text("a.JPEG\t0\nb.JPEG 1\n")
    with pytest.raises(ValueError, match=r"val_map.txt:2"):
        ZipDataset(str(zip_dir / "val.zip"), str(tmp_path / "val_map.txt"))


def test_zip_missing_map_file_is_named(zip_dir: Path, tmp_path: Path) -> None:
    cfg = _config(DATA_PATH=str(tmp_path), ZIP_MODE=True)
(tmp_path / "train.zip").write_bytes((zip_dir / "train.zip").read_bytes())
    with pytest.raises(FileNotFoundError, match="train_map.txt"):
        build_dataset(True, cfg)
