"""Seeds derived from where a run is, so random numbers do not depend on how the run got there.

A resumed run must draw the same augmentations, Mixup/CutMix boxes and drop-path masks as an
uninterrupted one, whatever the resume point, the number of loader workers or what else consumed
random numbers before. So instead of one stream that flows through the whole run, each sample and
each training step seeds the torch, numpy and ``random`` generators from a key such as
(SEED, epoch, sample index): ``derive_seed`` mixes the key, ``seed_all`` applies it, and
``isolated_rng`` does so without disturbing the caller's generators.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["SAMPLE_STREAM", "SHARD_SHUFFLE_STREAM", "STEP_STREAM", "derive_seed", "isolated_rng", "seed_all"]

# First key part of each kind of derived seed, so two kinds never share a stream.
SAMPLE_STREAM = 0  # data augmentation of one sample: (SAMPLE_STREAM, SEED, epoch, index)
STEP_STREAM = 1  # one training step in the main process: (STEP_STREAM, SEED, rank, epoch, step)
SHARD_SHUFFLE_STREAM = 2  # one rank's shuffle of its cached shard: (SHARD_SHUFFLE_STREAM, SEED, epoch, rank)


def derive_seed(*key: int) -> int:
    """A 32-bit seed that depends on every integer of ``key`` (mixed by numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([part % 2**64 for part in key]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run the block with the CPU generators seeded by ``seed``; restore their previous states after.

    Used per sample, where the loader may run in the training process itself (``NUM_WORKERS 0``).
    """
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    torch.random.default_generator.manual_seed(seed)  # the CPU generator only; CUDA ones are untouched
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
