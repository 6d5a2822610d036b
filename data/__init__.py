"""Data pipeline: ImageNet (folder or zip layout) and the embedded toy set, transforms, samplers, loaders."""

from .build import DataBundle, build_dataset, build_loader, seed_worker
from .datasets import CorruptImageError, FolderDataset, ImageDataset, ZipDataset
from .samplers import ShardedEvalSampler, ShardedTrainSampler
from .toy import TOY_CLASSES, ensure_toy_data
from .transforms import build_mixup, build_transform

__all__ = [
    "TOY_CLASSES",
    "CorruptImageError",
    "DataBundle",
    "FolderDataset",
    "ImageDataset",
    "ShardedEvalSampler",
    "ShardedTrainSampler",
    "ZipDataset",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "ensure_toy_data",
    "seed_worker",
]
