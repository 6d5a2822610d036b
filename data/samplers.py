"""Samplers that split a dataset between ranks by striding: rank r owns the indices r::world_size."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

from utils.seeding import SHARD_SHUFFLE_STREAM, derive_seed


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """The indices rank ``rank`` owns: ``rank::world_size`` (the shards of all ranks partition the data)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return range(rank, num_samples, world_size)


class ShardedEvalSampler(Sampler[int]):
    """Exact distributed evaluation: over all ranks every index comes exactly once, in order.

    Unlike ``DistributedSampler`` nothing is padded or dropped, so ranks may get one sample more or
    less than each other and metrics summed over ranks count each image once.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = shard_indices(len(dataset), rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ShardedTrainSampler(Sampler[int]):
    """Training order for a per-rank cache: a reshuffle of this rank's shard every epoch.

    Used with DATA.CACHE_MODE 'part', where each rank holds only the bytes of its shard in memory.
    Every rank yields ``len(dataset) // world_size`` indices, so all ranks run the same number of steps.
    The order is a function of (``seed``, epoch, ``rank``) alone, so runs are reproducible and resumable.
    The rank is part of the seed, as in the released trainer (which seeds each process with SEED + rank):
    with one permutation for all ranks, rank r would read the (r + 1)-th image of the data at every step
    where rank r - 1 reads the r-th, and on a class-sorted zip map (ImageNet's is) every step's batches
    would hold the same classes on all ranks.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int, seed: int = 0) -> None:
        self.indices = shard_indices(len(dataset), rank, world_size)
        self.num_samples = len(dataset) // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (call before iterating, like ``DistributedSampler``)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(derive_seed(SHARD_SHUFFLE_STREAM, self.seed, self.epoch, self.rank))
        order = torch.randperm(len(self.indices), generator=generator)[: self.num_samples]
        return iter([self.indices[i] for i in order.tolist()])

    def __len__(self) -> int:
        return self.num_samples
