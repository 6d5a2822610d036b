"""A training loader whose batches depend only on (SEED, epoch, position), so a run resumes bit-exactly.

* ``ResumableSampler`` wraps the training sampler (whose order is a function of SEED and the epoch, and
  of the rank with the per-rank shard shuffle of DATA.CACHE_MODE 'part') and yields ``(epoch, index)``
  pairs from a start position: a run resumed at step k of an epoch skips the first k batches without
  loading them.
* ``EpochSeededDataset`` seeds every sample's augmentation from (SEED, epoch, index), so the result
  is the same whichever loader worker (or the training process itself) loads it, and whatever was
  loaded before. The epoch travels with the index, which works with persistent workers too (they keep
  their own copy of the dataset, so an epoch set on the main process's copy would not reach them).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.seeding import SAMPLE_STREAM, derive_seed, isolated_rng

from .samplers import ShardedTrainSampler

__all__ = ["EpochSeededDataset", "ResumableSampler", "resumable_sampler"]


class ResumableSampler(Sampler[tuple[int, int]]):
    """The wrapped sampler's order for the current epoch as ``(epoch, index)`` pairs, from ``start`` on."""

    def __init__(self, sampler: DistributedSampler | ShardedTrainSampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the order of ``epoch`` and skip its first ``start`` indices (call before iterating)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.sampler.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in itertools.islice(iter(self.sampler), self.start, None):
            yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)


class EpochSeededDataset(Dataset):
    """``dataset[index]`` with torch, numpy and ``random`` seeded from (``seed``, epoch, index).

    Items are requested as ``(epoch, index)`` (what ``ResumableSampler`` yields). The generators of
    the process are restored afterwards.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with isolated_rng(derive_seed(SAMPLE_STREAM, self.seed, epoch, index)):
            return self.dataset[index]


def resumable_sampler(loader: DataLoader) -> ResumableSampler:
    """The ``ResumableSampler`` of a training loader built by ``build_loader``."""
    if not isinstance(loader.sampler, ResumableSampler):
        raise TypeError(f"the training loader needs a ResumableSampler, got {type(loader.sampler).__name__}")
    return loader.sampler
