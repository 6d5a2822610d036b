"""Labelled image datasets for the ImageNet folder layout and the released zip layout.

Both read images lazily and convert every mode (grayscale, CMYK, palette, RGBA, ...) to RGB. An image that
cannot be decoded stops the run with an error that names the file, or, with ``skip_corrupt``, is replaced
by the next readable sample, logged and counted (``num_skipped``, shared by all loader workers). In an
evaluation split (``ignore_stand_ins``) the replacement carries ``IGNORED_LABEL``, so it fills the batch
without being scored twice.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from utils.errors import ConfigError, CorruptImageError, DataError, MissingDataError
from utils.logger import get_logger

from .samplers import shard_indices

logger = get_logger(__name__)

CACHE_MODES = ("no", "part", "full")
# The label of a stand-in for an unreadable evaluation image: evaluation leaves such samples out (as
# cross-entropy's default ignore_index does).
IGNORED_LABEL = -100
# What decoding a broken file (or a member missing from a zip) can raise.
_UNREADABLE = (OSError, ValueError, KeyError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """Base class: ``(name, label)`` samples whose images subclasses open in ``_open``.

    ``__getitem__`` returns ``(transform(rgb_image), label)``.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        num_classes: int,
        transform: Callable[[Image.Image], Any] | None,
        skip_corrupt: bool,
        ignore_stand_ins: bool = False,
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.num_classes = num_classes
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.ignore_stand_ins = ignore_stand_ins
        # One flag per sample in shared memory, so skips in loader workers are visible to the main process.
        self._skipped = torch.zeros(len(samples), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable images were skipped so far (all workers together)."""
        return int(self._skipped.sum())

    def _open(self, index: int) -> Image.Image:
        """Open (lazily) the image of sample ``index``."""
        raise NotImplementedError

    def load_rgb(self, index: int) -> Image.Image:
        """The decoded RGB image of sample ``index``; ``CorruptImageError`` naming the file if unreadable."""
        try:
            with self._open(index) as image:
                return image.convert("RGB")
        except _UNREADABLE as err:
            raise CorruptImageError(
                f"cannot read image {self.samples[index][0]}: {err} (DATA.SKIP_CORRUPT skips such files)"
            ) from err

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        """Sample ``index``, or with ``skip_corrupt`` the next readable one after it (wrapping around), labelled
        ``IGNORED_LABEL`` with ``ignore_stand_ins``."""
        if not self.skip_corrupt:
            return self.load_rgb(index), self.targets[index]
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if self._skipped[candidate]:
                continue
            try:
                image = self.load_rgb(candidate)
                return image, IGNORED_LABEL if step and self.ignore_stand_ins else self.targets[candidate]
            except CorruptImageError as err:
                self._skipped[candidate] = True
                logger.warning("skipping unreadable image: %s", err)
        raise CorruptImageError(f"no readable image among the {len(self)} samples of this dataset")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self._load_readable(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class FolderDataset(ImageDataset):
    """The ImageNet folder layout ``root/<class>/<image>``; labels index the sorted class folders."""

    def __init__(
        self,
        root: str,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        ignore_stand_ins: bool = False,
    ) -> None:
        if not os.path.isdir(root):
            raise MissingDataError(f"image folder {root} does not exist")
        try:
            classes, class_to_idx = find_classes(root)
            samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as error:  # no class folder, or one without images (named without root)
            raise MissingDataError(f"image folder {root}: {error}") from None
        super().__init__(samples, classes, len(classes), transform, skip_corrupt, ignore_stand_ins)
        self.root = root

    def _open(self, index: int) -> Image.Image:
        return Image.open(self.samples[index][0])


def read_map_file(path: str) -> list[tuple[str, int]]:
    """Parse a released ``*_map.txt``: one ``<path inside the zip>\\t<class index>`` per line."""
    if not os.path.isfile(path):
        raise MissingDataError(f"zip map file {path} does not exist")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 2 or not parts[1].strip().isdigit():
                raise DataError(f"{path}:{number}: expected '<path>\\t<class index>', got {line.strip()!r}")
            samples.append((parts[0], int(parts[1])))
    if not samples:
        raise DataError(f"zip map file {path} lists no images")
    return samples


def cache_indices(cache_mode: str, num_samples: int, rank: int, world_size: int) -> Iterable[int]:
    """The samples whose bytes a process keeps in memory under DATA.CACHE_MODE ``cache_mode``."""
    if cache_mode == "no":
        return range(0)
    if cache_mode == "part":
        return shard_indices(num_samples, rank, world_size)
    if cache_mode == "full":
        return range(num_samples)
    raise ConfigError(f"DATA.CACHE_MODE must be one of {CACHE_MODES}, got {cache_mode!r}")


class ZipDataset(ImageDataset):
    """The released zip layout: images inside ``zip_path``, listed with their labels in ``map_path``.

    Uncached images are read lazily through a ``ZipFile`` that each process opens for itself on first
    use (a handle is never shared across ``fork`` nor pickled). ``cache_mode`` 'part' keeps the bytes of
    this rank's shard (``rank::world_size``) in memory, 'full' those of every image.
    """

    def __init__(
        self,
        zip_path: str,
        map_path: str,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        cache_mode: str = "no",
        rank: int = 0,
        world_size: int = 1,
        ignore_stand_ins: bool = False,
    ) -> None:
        if not os.path.isfile(zip_path):
            raise MissingDataError(f"zip file {zip_path} does not exist")
        samples = read_map_file(map_path)
        labels = sorted({label for _, label in samples})
        classes = [str(label) for label in labels]
        super().__init__(samples, classes, labels[-1] + 1, transform, skip_corrupt, ignore_stand_ins)
        self.zip_path = zip_path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._cache = self._read_cache(cache_indices(cache_mode, len(samples), rank, world_size))

    def _read_cache(self, indices: Iterable[int]) -> dict[int, bytes]:
        """The bytes of ``indices``; members missing from the zip are left out (they fail when loaded)."""
        cache = {}
        try:
            archive = zipfile.ZipFile(self.zip_path)
        except zipfile.BadZipFile as error:
            raise DataError(f"zip file {self.zip_path} cannot be read as a zip archive: {error}") from None
        with archive:
            for index in indices:
                try:
                    cache[index] = archive.read(self.samples[index][0])
                except KeyError:
                    continue
        if cache:
            size_mb = sum(map(len, cache.values())) / 2**20
            logger.info("cached %d images (%.1f MiB) of %s", len(cache), size_mb, self.zip_path)
        return cache

    @property
    def cached_indices(self) -> list[int]:
        """The samples held in memory, in order."""
        return sorted(self._cache)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = None  # each process opens its own handle
        return state

    def _archive(self) -> zipfile.ZipFile:
        """This process's handle on the zip, opened on first use (and again after a fork)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return self._zip

    def _open(self, index: int) -> Image.Image:
        data = self._cache.get(index)
        if data is None:
            data = self._archive().read(self.samples[index][0])
        return Image.open(io.BytesIO(data))
