"""Datasets, samplers and loaders of a training run, built from the config.

Training order comes from ``DistributedSampler(shuffle=True, seed=SEED)`` even on one process, or, when each
rank caches only its shard (zip layout, DATA.CACHE_MODE 'part'), from ``ShardedTrainSampler`` (a shuffle of the
shard seeded by SEED, epoch and rank), so it is reproducible and resumable with ``set_epoch``. Evaluation is
exact: every validation image is counted exactly once whatever the world size (``ShardedEvalSampler``, no
padding, no dropped last batch).
``build_loader(..., train=False)`` reads the validation split alone (``--eval``), so evaluating a checkpoint
needs neither the training images nor time to cache them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from yacs.config import CfgNode

from utils.errors import ConfigError, DataError, MissingDataError
from utils.logger import get_logger

from .datasets import FolderDataset, ImageDataset, ZipDataset
from .resumable import EpochSeededDataset, ResumableSampler
from .samplers import ShardedEvalSampler, ShardedTrainSampler
from .toy import toy_data_path
from .transforms import build_mixup, build_transform

logger = get_logger(__name__)

DATASETS = ("imagenet", "toy")


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side; the training fields are None when evaluating only."""

    dataset_val: ImageDataset
    loader_val: DataLoader
    num_classes: int
    dataset_train: ImageDataset | None = None
    loader_train: DataLoader | None = None
    sampler_train: DistributedSampler | ShardedTrainSampler | None = None  # call set_epoch(epoch) every epoch
    mixup_fn: Mixup | None = None


def _data_root(config: CfgNode) -> str:
    """The folder that holds train/ and val/ (or the zip files), checked to exist."""
    if config.DATA.DATASET not in DATASETS:
        raise ConfigError(f"DATA.DATASET must be one of {DATASETS}, got {config.DATA.DATASET!r}")
    if config.DATA.DATASET == "toy":
        if config.DATA.ZIP_MODE:
            raise ConfigError("DATA.ZIP_MODE is not supported with DATA.DATASET 'toy' (a folder dataset)")
        return str(toy_data_path(config))
    path = config.DATA.DATA_PATH
    if not path:
        raise ConfigError("DATA.DATA_PATH is empty: set it to the dataset root (or use --data-path)")
    if not os.path.isdir(path):
        raise MissingDataError(f"DATA.DATA_PATH {path} does not exist or is not a folder")
    return path


def _build_split(is_train: bool, config: CfgNode, rank: int, world_size: int) -> ImageDataset:
    """The train or val split in the layout the config names, with its transform."""
    split = "train" if is_train else "val"
    root = _data_root(config)
    transform = build_transform(is_train, config)
    if config.DATA.ZIP_MODE:
        return ZipDataset(
            os.path.join(root, f"{split}.zip"),
            os.path.join(root, f"{split}_map.txt"),
            transform,
            config.DATA.SKIP_CORRUPT,
            config.DATA.CACHE_MODE,
            rank,
            world_size,
            ignore_stand_ins=not is_train,
        )
    return FolderDataset(os.path.join(root, split), transform, config.DATA.SKIP_CORRUPT, ignore_stand_ins=not is_train)


def _check_num_classes(dataset: ImageDataset, config: CfgNode) -> None:
    if dataset.num_classes != config.MODEL.NUM_CLASSES:
        raise ConfigError(
            f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but the dataset has {dataset.num_classes} "
            f"classes ({len(dataset)} images)"
        )


def _check_same_classes(train: ImageDataset, val: ImageDataset) -> None:
    """Labels only line up when both splits have the same classes."""
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        raise DataError(f"train and val classes differ: only in train {only_train}, only in val {only_val}")


def build_dataset(is_train: bool, config: CfgNode, rank: int = 0, world_size: int = 1) -> tuple[ImageDataset, int]:
    """One split and its number of classes, checked against MODEL.NUM_CLASSES.

    ``rank`` and ``world_size`` only matter for DATA.CACHE_MODE 'part' (which shard to cache).
    """
    dataset = _build_split(is_train, config, rank, world_size)
    _check_num_classes(dataset, config)
    return dataset, dataset.num_classes


def seed_worker(worker_id: int) -> None:
    """Seed ``numpy`` and ``random`` of a loader worker from torch's per-worker seed (base seed + worker id).

    The recipe of PyTorch's reproducibility notes: augmentations draw from all three generators, and their
    streams stay a function of the torch seed alone, whatever the torch version does by default.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _train_sampler(
    config: CfgNode, dataset: ImageDataset, rank: int, world_size: int
) -> DistributedSampler | ShardedTrainSampler:
    """A shuffle over all ranks, or over this rank's shard when only that shard is cached."""
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        return ShardedTrainSampler(dataset, rank, world_size, seed=config.SEED)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)


def _loader(config: CfgNode, dataset: ImageDataset, sampler: Sampler, drop_last: bool) -> DataLoader:
    workers = config.DATA.NUM_WORKERS
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=config.DATA.BATCH_SIZE,
        num_workers=workers,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
    )


def _val_loader(config: CfgNode, dataset_val: ImageDataset, rank: int, world_size: int) -> DataLoader:
    return _loader(config, dataset_val, ShardedEvalSampler(dataset_val, rank, world_size), drop_last=False)


def build_loader(config: CfgNode, rank: int, world_size: int, train: bool = True) -> DataBundle:
    """The splits with their samplers and loaders for process ``rank`` of ``world_size``, and Mixup.

    With ``train=False`` only the validation split is read (the training fields of the bundle are None).
    """
    if not train:
        dataset_val, num_classes = build_dataset(False, config, rank, world_size)
        logger.info("data: %d val images, %d classes (evaluation only)", len(dataset_val), num_classes)
        return DataBundle(dataset_val, _val_loader(config, dataset_val, rank, world_size), num_classes)
    dataset_train = _build_split(True, config, rank, world_size)
    dataset_val = _build_split(False, config, rank, world_size)
    _check_same_classes(dataset_train, dataset_val)
    _check_num_classes(dataset_train, config)
    mixup_fn = build_mixup(config)
    if mixup_fn is not None and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"Mixup/CutMix need an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}")
    sampler_train = _train_sampler(config, dataset_train, rank, world_size)
    if len(sampler_train) < config.DATA.BATCH_SIZE:
        raise ConfigError(
            f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is more than the {len(sampler_train)} training images each "
            f"of the {world_size} processes gets ({len(dataset_train)} in all): not one full batch per epoch"
        )
    loader_val = _val_loader(config, dataset_val, rank, world_size)
    logger.info(
        "data: %d train / %d val images, %d classes; rank %d of %d gets %d / %d",
        len(dataset_train),
        len(dataset_val),
        dataset_train.num_classes,
        rank,
        world_size,
        len(sampler_train),
        len(loader_val.sampler),
    )
    return DataBundle(
        dataset_val=dataset_val,
        loader_val=loader_val,
        num_classes=dataset_train.num_classes,
        dataset_train=dataset_train,
        # batches depend only on (SEED, epoch, position): see resumable.py
        loader_train=_loader(
            config, EpochSeededDataset(dataset_train, config.SEED), ResumableSampler(sampler_train), drop_last=True
        ),
        sampler_train=sampler_train,
        mixup_fn=mixup_fn,
    )
