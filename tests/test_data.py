"""Tests of the data package: toy set, folder and zip layouts, checks, transforms, samplers, loaders."""

from __future__ import annotations

import logging
import multiprocessing
import re
import socket
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms
from yacs.config import CfgNode

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
from data.datasets import IGNORED_LABEL
from data.resumable import ResumableSampler
from data.toy import toy_dataset_dir, toy_root
from engine import evaluate
from utils.errors import ConfigError, DataError, MissingDataError

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


def _config(**data: object) -> CfgNode:
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


def test_toy_generation_removes_the_lock_of_a_dead_process(toy_dir: Path, tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    final = toy_dataset_dir(tmp_path, TOY_SIZE, TOY_TRAIN, TOY_VAL)
    (tmp_path / f"{final.name}.lock").write_text(f"{socket.gethostname()} {finished.pid}")
    assert _files(_toy(tmp_path)) == _files(toy_dir)


def test_toy_root_defaults_to_the_repo_cache() -> None:
    assert toy_root(_config()) == Path(__file__).resolve().parents[1] / ".cache" / "toy_data"
    assert toy_root(_config(TOY_ROOT="/somewhere")) == Path("/somewhere")


def test_toy_incomplete_folder_is_an_error(tmp_path: Path) -> None:
    toy_dataset_dir(tmp_path, TOY_SIZE, TOY_TRAIN, TOY_VAL).mkdir()
    with pytest.raises(DataError, match="incomplete"):
        _toy(tmp_path)


def test_build_loader_on_toy_data(toy_dir: Path) -> None:
    bundle = build_loader(
        _config(
            DATASET="toy",
            TOY_ROOT=str(toy_dir.parent),
            TOY_IMAGE_SIZE=TOY_SIZE,
            TOY_TRAIN_PER_CLASS=TOY_TRAIN,
            TOY_VAL_PER_CLASS=TOY_VAL,
        ),
        0,
        1,
    )
    assert bundle.num_classes == len(TOY_CLASSES)
    assert isinstance(bundle.sampler_train, DistributedSampler)
    images, targets = next(iter(bundle.loader_train))
    assert images.shape == (4, 3, 16, 16)
    assert len(bundle.loader_train) == len(TOY_CLASSES) * TOY_TRAIN // 4  # drop_last
    assert sum(len(y) for _, y in bundle.loader_val) == len(TOY_CLASSES) * TOY_VAL  # nothing dropped
    _, soft = bundle.mixup_fn(images, targets)
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
    dataset = ZipDataset(
        str(tmp_path / "train.zip"), str(tmp_path / "train_map.txt"), cache_mode=cache_mode, rank=1, world_size=2
    )
    assert dataset.cached_indices == expected


def test_zip_reads_in_forked_workers_after_the_parent_read(zip_dir: Path) -> None:
    dataset = ZipDataset(str(zip_dir / "val.zip"), str(zip_dir / "val_map.txt"), transforms.PILToTensor())
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])  # the parent opens its own handle
    loader = DataLoader(dataset, batch_size=3, num_workers=2, multiprocessing_context="fork")
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)


def test_zip_unknown_cache_mode_is_an_error(zip_dir: Path) -> None:
    with pytest.raises(ConfigError, match="DATA.CACHE_MODE"):
        ZipDataset(str(zip_dir / "val.zip"), str(zip_dir / "val_map.txt"), cache_mode="some")


def test_zip_malformed_map_line_is_an_error(zip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "val_map.txt").write_text("a.JPEG\t0\nb.JPEG 1\n")
    with pytest.raises(DataError, match=r"val_map.txt:2"):
        ZipDataset(str(zip_dir / "val.zip"), str(tmp_path / "val_map.txt"))


def test_zip_missing_map_file_is_named(zip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "train.zip").write_bytes((zip_dir / "train.zip").read_bytes())
    with pytest.raises(MissingDataError, match="train_map.txt"):
        build_dataset(True, _config(DATA_PATH=str(tmp_path), ZIP_MODE=True))


# ----------------------------------------------------------------------------- checks with clear errors


def test_unset_data_path_is_an_error() -> None:
    with pytest.raises(ConfigError, match="DATA.DATA_PATH"):
        build_dataset(True, _config(DATA_PATH=""))


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingDataError, match=re.escape(str(missing))):
        build_dataset(True, _config(DATA_PATH=str(missing)))


def test_empty_data_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "train"))):
        build_dataset(True, _config(DATA_PATH=str(tmp_path)))


def test_folder_without_class_folders_is_named(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "train"))):
        build_dataset(True, _config(DATA_PATH=str(tmp_path)))


def test_batch_larger_than_a_process_share_of_the_train_set_is_named(tmp_path: Path) -> None:
    root = _make_folder_set(tmp_path, train=["ant", "bee"], val=["ant", "bee"])  # 4 training images
    cfg = _config(DATA_PATH=str(root), BATCH_SIZE=4)
    cfg.MODEL.NUM_CLASSES = 2
    with pytest.raises(ConfigError, match="BATCH_SIZE 4 is more than the 2 training images each of the 2 processes"):
        build_loader(cfg, 0, 2)


def test_train_and_val_classes_that_differ_are_named(tmp_path: Path) -> None:
    root = _make_folder_set(tmp_path, train=["ant", "bee"], val=["ant", "cat"])
    cfg = _config(DATA_PATH=str(root))
    cfg.MODEL.NUM_CLASSES = 2
    with pytest.raises(DataError, match=r"only in train \['bee'\], only in val \['cat'\]"):
        build_loader(cfg, 0, 1)


def test_num_classes_mismatch_names_both_numbers(tmp_path: Path) -> None:
    root = _make_folder_set(tmp_path, train=["ant", "bee"], val=["ant", "bee"])
    cfg = _config(DATA_PATH=str(root))
    cfg.MODEL.NUM_CLASSES = 1000
    with pytest.raises(ConfigError, match=r"MODEL.NUM_CLASSES is 1000 but the dataset has 2 classes"):
        build_dataset(False, cfg)


@pytest.fixture
def corrupt_set(tmp_path: Path) -> tuple[Path, Path]:
    """A folder set whose class 'bee' holds a truncated JPEG; returns (root, corrupt file)."""
    root = _make_folder_set(tmp_path, train=["ant", "bee"], val=["ant", "bee"])
    corrupt = root / "train" / "bee" / "bee_0.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    return root, corrupt


def test_corrupt_image_is_named(corrupt_set: tuple[Path, Path]) -> None:
    root, corrupt = corrupt_set
    dataset = FolderDataset(str(root / "train"))
    index = [path for path, _ in dataset.samples].index(str(corrupt))
    with pytest.raises(CorruptImageError, match=re.escape(str(corrupt))):
        dataset[index]


def test_corrupt_image_is_skipped_and_counted(corrupt_set: tuple[Path, Path]) -> None:
    root, corrupt = corrupt_set
    dataset = FolderDataset(str(root / "train"), transforms.PILToTensor(), skip_corrupt=True)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork")
    images = torch.cat([batch for batch, _ in loader])
    assert len(images) == len(dataset) == 4
    assert dataset.num_skipped == 1  # counted in a worker, seen by the main process


def test_unreadable_val_image_is_left_out_of_evaluation(tmp_path: Path) -> None:
    """In an evaluation split the readable neighbour standing in for an unreadable image is not scored: a model that
    always answers 'ant' gets 2 of the 3 readable images right (2 of 4 if the stand-in counted)."""
    root = _make_folder_set(tmp_path, train=["ant", "bee"], val=["ant", "bee"])
    corrupt = root / "val" / "bee" / "bee_0.JPEG"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    dataset = FolderDataset(str(root / "val"), transforms.ToTensor(), skip_corrupt=True, ignore_stand_ins=True)
    index = [path for path, _ in dataset.samples].index(str(corrupt))
    assert dataset[index][1] == IGNORED_LABEL and dataset[index - 1][1] == 0

    class AlwaysAnt(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[1.0, 0.0]]).expand(len(images), 2)

    loader = DataLoader(dataset, batch_size=3)
    result = evaluate(AlwaysAnt(), loader, torch.device("cpu"), None, logging.getLogger("test"))
    assert result["num_images"] == 3 and result["num_skipped"] == 1
    assert result["acc1"] == pytest.approx(200 / 3)


def test_class_folder_without_images_names_the_split(tmp_path: Path) -> None:
    root = _make_folder_set(tmp_path, train=["ant"], val=["ant"])
    (root / "val" / "fish").mkdir()
    with pytest.raises(MissingDataError, match=re.escape(f"image folder {root / 'val'}: ") + ".*fish"):
        FolderDataset(str(root / "val"))


def test_auto_augment_section_timm_does_not_know_is_named() -> None:
    cfg = _config()
    cfg.AUG.AUTO_AUGMENT = "rand-m9-xyz3"
    with pytest.raises(ConfigError, match="timm cannot build AUG.AUTO_AUGMENT 'rand-m9-xyz3'"):
        build_transform(True, cfg)


def test_image_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "ant").mkdir()
    (tmp_path / "ant" / "notes.JPEG").write_text("not an image")
    with pytest.raises(CorruptImageError, match="notes.JPEG"):
        FolderDataset(str(tmp_path))[0]


@pytest.mark.parametrize(("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("P", "PNG"), ("RGBA", "PNG")])
def test_other_image_modes_load_as_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    _save_image(tmp_path / "ant" / f"image.{fmt.lower()}", mode=mode, fmt=fmt)
    image, label = FolderDataset(str(tmp_path), build_transform(False, _config()))[0]
    assert image.shape == (3, 16, 16)
    assert label == 0


# ----------------------------------------------------------------------------- transforms and mixup


def test_eval_transform_resizes_to_256_and_crops_224() -> None:
    cfg = _config()
    cfg.DATA.IMG_SIZE = 224
    transform = build_transform(False, cfg)
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, transforms.Resize) and resize.size == 256
    assert resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(crop, transforms.CenterCrop) and crop.size == (224, 224)
    assert transform(Image.new("RGB", (300, 400))).shape == (3, 224, 224)


def test_eval_transform_without_crop_resizes_to_the_square() -> None:
    cfg = _config()
    cfg.TEST.CROP = False
    transform = build_transform(False, cfg)
    assert transform.transforms[0].size == (16, 16)
    assert transform(Image.new("RGB", (30, 20))).shape == (3, 16, 16)


def test_train_transform_follows_the_config() -> None:
    cfg = _config()
    cfg.DATA.IMG_SIZE = 64
    names = [type(t).__name__ for t in build_transform(True, cfg).transforms]
    assert names[0] == "RandomResizedCropAndInterpolation"
    assert "RandAugment" in names and "RandomErasing" in names
    cfg.AUG.AUTO_AUGMENT = "none"
    names = [type(t).__name__ for t in build_transform(True, cfg).transforms]
    assert "RandAugment" not in names and "ColorJitter" in names


def test_small_train_transform_uses_padded_random_crop() -> None:
    transform = build_transform(True, _config())  # IMG_SIZE 16 <= 32
    resize, crop = transform.transforms[0].transforms
    assert isinstance(resize, transforms.Resize) and resize.size == 16
    assert isinstance(crop, transforms.RandomCrop) and crop.padding == 4
    assert transform(Image.new("RGB", (40, 40))).shape == (3, 16, 16)


def test_train_transform_posterize_accepts_zero_bits() -> None:
    transform = build_transform(True, _config())
    ops = [op for stage in transform.transforms if isinstance(stage, auto_augment.RandAugment) for op in stage.ops]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    black = posterize.aug_fn(Image.new("RGB", (4, 4), (200, 100, 50)), 0)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_mixup_gives_soft_targets() -> None:
    cfg = _config()
    mixup = build_mixup(cfg)
    assert mixup is not None and mixup.mixup_alpha == cfg.AUG.MIXUP and mixup.cutmix_alpha == cfg.AUG.CUTMIX
    torch.manual_seed(0)
    _, targets = mixup(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, len(TOY_CLASSES))
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert (targets.max(dim=1).values < 1).all()  # smoothed and mixed, never one-hot


def test_mixup_is_off_when_disabled() -> None:
    cfg = _config()
    cfg.AUG.MIXUP = 0.0
    cfg.AUG.CUTMIX = 0.0
    assert build_mixup(cfg) is None


# ----------------------------------------------------------------------------- samplers and loaders


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [0, 1, 7, 10])
def test_sharded_eval_sampler_counts_every_index_once(world_size: int, num_samples: int) -> None:
    data = range(num_samples)
    shards = [list(ShardedEvalSampler(data, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(data)
    assert [len(ShardedEvalSampler(data, rank, world_size)) for rank in range(world_size)] == list(map(len, shards))


def test_sharded_eval_sampler_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        ShardedEvalSampler(range(5), 2, 2)


def test_sharded_train_sampler_shuffles_the_shard_per_epoch() -> None:
    data = range(11)
    samplers = [ShardedTrainSampler(data, rank, 3, seed=5) for rank in range(3)]
    epoch0 = [list(sampler) for sampler in samplers]
    assert [len(order) for order in epoch0] == [3, 3, 3]  # equal steps on every rank
    assert all(i % 3 == rank for rank, order in enumerate(epoch0) for i in order)
    assert epoch0 == [list(sampler) for sampler in samplers]  # reproducible
    for sampler in samplers:
        sampler.set_epoch(1)
    assert epoch0 != [list(sampler) for sampler in samplers]


def _shard_positions(sampler: ShardedTrainSampler, world_size: int) -> list[int]:
    """The sampler's order as positions within its shard (index // world_size)."""
    return [index // world_size for index in sampler]


def test_sharded_train_sampler_shuffles_each_rank_independently() -> None:
    """Regression: every rank drew the same permutation of its shard (seed + epoch), so at each step rank r read
    the image next to rank r - 1's; on a class-sorted map both ranks then trained on the same classes."""
    labels = [i // 4 for i in range(40)]  # class-sorted, 4 images per class, like an ImageNet map
    for epoch in range(3):
        samplers = [ShardedTrainSampler(labels, rank, 2, seed=7) for rank in range(2)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        assert _shard_positions(samplers[0], 2) != _shard_positions(samplers[1], 2)
        pairs = list(zip(*[[labels[i] for i in sampler] for sampler in samplers]))
        same_class = sum(a == b for a, b in pairs)
        assert same_class < len(pairs) // 2, f"epoch {epoch}: {same_class} of {len(pairs)} steps share a class"


def test_sharded_train_sampler_order_is_a_function_of_seed_epoch_and_rank() -> None:
    def order(seed: int, epoch: int, rank: int) -> list[int]:
        sampler = ShardedTrainSampler(range(40), rank, 2, seed=seed)
        sampler.set_epoch(epoch)
        return _shard_positions(sampler, 2)

    reference = order(3, 1, 0)
    assert order(3, 1, 0) == reference  # a fresh sampler (a new process) draws the same order
    assert sorted(reference) == list(range(20))
    assert all(other != reference for other in (order(4, 1, 0), order(3, 2, 0), order(3, 1, 1)))


def test_part_cache_resume_mid_epoch_continues_the_same_order() -> None:
    """A run resumed at a position of an epoch (a fresh sampler, set_epoch(epoch, start)) reads the rest of the
    order an uninterrupted run (one sampler through every epoch) reads."""
    for rank in range(2):
        uninterrupted = ResumableSampler(ShardedTrainSampler(range(41), rank, 2, seed=11))
        for epoch in range(3):
            uninterrupted.set_epoch(epoch)
            full = list(uninterrupted)
        resumed = ResumableSampler(ShardedTrainSampler(range(41), rank, 2, seed=11))
        resumed.set_epoch(2, start=6)
        assert len(resumed) == len(full) - 6 == 14
        assert list(resumed) == full[6:]
        assert all(epoch == 2 for epoch, _ in full)


def test_part_cache_ranks_train_on_different_classes_at_each_step(tmp_path: Path) -> None:
    """build_loader on a class-sorted zip map (DATA.CACHE_MODE part, two ranks): the steps' classes differ."""
    toy = ensure_toy_data(tmp_path / "toy", TOY_SIZE, 4, 1)
    for split in ("train", "val"):
        _zip_split(FolderDataset(str(toy / split)), tmp_path, split)
    cfg = _config(DATA_PATH=str(tmp_path), ZIP_MODE=True, CACHE_MODE="part")
    bundles = [build_loader(cfg, rank, 2) for rank in range(2)]
    targets = bundles[0].dataset_train.targets
    assert targets == sorted(targets)
    for epoch in range(2):
        classes = []
        for bundle in bundles:
            bundle.sampler_train.set_epoch(epoch)
            classes.append([targets[index] for index in bundle.sampler_train])
        same_class = sum(a == b for a, b in zip(*classes))
        assert same_class < len(classes[0]) // 2, f"epoch {epoch}: {same_class} of {len(classes[0])} steps"


def test_part_cache_trains_on_the_cached_shard(zip_dir: Path) -> None:
    cfg = _config(DATA_PATH=str(zip_dir), ZIP_MODE=True, CACHE_MODE="part")
    bundle = build_loader(cfg, 1, 2)
    assert isinstance(bundle.sampler_train, ShardedTrainSampler)
    assert set(bundle.sampler_train) <= set(bundle.dataset_train.cached_indices)


def test_seed_worker_gives_workers_distinct_numpy_streams() -> None:
    class NumpyDraw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> float:
            return float(np.random.rand())

    def draws() -> list[float]:
        torch.manual_seed(0)
        loader = DataLoader(NumpyDraw(), num_workers=2, worker_init_fn=seed_worker, multiprocessing_context="fork")
        return [float(x) for x in loader]

    first = draws()
    assert first == draws()  # reproducible from torch's seed
    assert first[0] != first[1]  # workers 0 and 1 take turns: different streams
