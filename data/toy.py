"""An embedded, deterministic and learnable 10-class image set for demos and smoke tests.

Each class is a shape drawn large at a random position, filled with a texture and a hue that belong to the
class; the exact colours, size, position, a small rotation and the background are nuisances. The three
cues are redundant (shape and texture survive crops, flips, rotations and colour inversions, the hue
survives crops and geometry), so a tiny model learns the set in minutes on a CPU.

The images are written once, in the ImageNet folder layout (``train/<class>/*.JPEG``, ``val/...``), into a
folder named after the generation parameters. Several processes (torchrun ranks) may ask for the set at
the same time: one generates it into a temporary folder and renames it into place atomically, the others
poll for the completion marker inside it.
"""

from __future__ import annotations

import colorsys
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from yacs.config import CfgNode

from utils.errors import DataError
from utils.logger import get_logger

logger = get_logger(__name__)

# Bump when the images change, so caches of an older version are not reused.
_FORMAT_VERSION = 2
_SEED = 20240531
_MARKER = "COMPLETE"
_SPLITS = ("train", "val")
_CIRCLE = 32  # vertices of the polygon that approximates a circle

Polygon = np.ndarray  # (N, 2) points in units of the shape radius, y pointing down
ShapeParts = list[tuple[Polygon, int]]  # polygons drawn in order with fill 255 (add) or 0 (cut out)
Pattern = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]


def _regular(n: int, radius: float = 1.0, start: float = -np.pi / 2) -> Polygon:
    """A regular n-gon of the given circumradius, first vertex at ``start`` (default: pointing up)."""
    angles = start + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _star(points: int, inner: float) -> Polygon:
    outer = _regular(2 * points)
    outer[1::2] *= inner
    return outer


def _shift(polygon: Polygon, dx: float, dy: float) -> Polygon:
    return polygon + np.array([dx, dy])


_SHAPES: dict[str, ShapeParts] = {
    "disc": [(_regular(_CIRCLE), 255)],
    "square": [(_regular(4, 1.2, np.pi / 4), 255)],
    "triangle": [(_shift(_regular(3, 1.15), 0.0, 0.2), 255)],
    "plus": [(_rect(-1, -0.3, 1, 0.3), 255), (_rect(-0.3, -1, 0.3, 1), 255)],
    "star": [(_star(5, 0.45), 255)],
    "ring": [(_regular(_CIRCLE), 255), (_regular(_CIRCLE, 0.55), 0)],
    "bars": [(_rect(-1, -0.8, 1, -0.25), 255), (_rect(-1, 0.25, 1, 0.8), 255)],
    "tee": [(_rect(-1, -0.9, 1, -0.4), 255), (_rect(-0.27, -0.4, 0.27, 1), 255)],
    "crescent": [(_regular(_CIRCLE), 255), (_shift(_regular(_CIRCLE, 0.85), 0.5, 0.0), 0)],
    "frame": [(_rect(-0.9, -0.9, 0.9, 0.9), 255), (_rect(-0.45, -0.45, 0.45, 0.45), 0)],
}


def _bands(coord: np.ndarray, period: float, rng: np.random.Generator, duty: float = 0.5) -> np.ndarray:
    """1 on parallel bands across ``coord`` (``duty`` of each period), 0 elsewhere; random phase."""
    return ((coord / period + rng.random()) % 1.0 < duty).astype(float)


def _solid(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return np.ones_like(x)


def _hstripes(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _bands(y, period, rng)


def _vstripes(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _bands(x, period, rng)


def _checker(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return np.abs(_bands(x, period, rng) - _bands(y, period, rng))


def _dots(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    u = (x / period + rng.random()) % 1.0 - 0.5
    v = (y / period + rng.random()) % 1.0 - 0.5
    return (u**2 + v**2 > 0.09).astype(float)


def _grid(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(_bands(x, period, rng, 0.3), _bands(y, period, rng, 0.3))


def _crosshatch(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _grid((x + y) / np.sqrt(2), (x - y) / np.sqrt(2), period, rng)


def _rings(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _bands(np.hypot(x - x.mean(), y - y.mean()), period, rng)


def _speckle(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    cell = max(1, int(period / 2))
    blocks = rng.random((x.shape[0] // cell + 1, x.shape[1] // cell + 1)) < 0.5
    return np.kron(blocks, np.ones((cell, cell)))[: x.shape[0], : x.shape[1]]


def _zigzag(x: np.ndarray, y: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    return _bands(y + np.abs((x / period) % 1.0 - 0.5) * period, period, rng)


# One (shape, texture) pair per class; the class name is the shape name.
_CLASSES: tuple[tuple[str, Pattern], ...] = (
    ("disc", _solid),
    ("square", _hstripes),
    ("triangle", _vstripes),
    ("plus", _checker),
    ("star", _dots),
    ("ring", _crosshatch),
    ("bars", _grid),
    ("tee", _rings),
    ("crescent", _speckle),
    ("frame", _zigzag),
)
TOY_CLASSES: tuple[str, ...] = tuple(name for name, _ in _CLASSES)


def _shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) mask of the named shape, large, slightly rotated and off-centre."""
    radius = size * rng.uniform(0.28, 0.38)
    centre = size / 2 + size * rng.uniform(-0.12, 0.12, size=2)
    angle = rng.uniform(-0.25, 0.25)  # radians
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, fill in _SHAPES[name]:
        points = polygon @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=fill)
    return np.asarray(mask) > 127


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return 255 * np.array(colorsys.hsv_to_rgb(hue, saturation, value))


def _colours(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(foreground, texture, background) colours: the foreground is saturated and has the hue of the class,
    the texture is a darker shade of it, the background a dull colour of random hue, dark or light."""
    hue = (label / len(_CLASSES) + rng.uniform(-0.02, 0.02)) % 1.0
    foreground = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    brightness = rng.uniform(0.05, 0.3) if rng.random() < 0.5 else rng.uniform(0.8, 1.0)
    background = _hsv(rng.random(), rng.uniform(0.0, 0.3), brightness)
    return foreground, 0.45 * foreground, background


def render_toy_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one RGB image of class ``label`` (an index into ``TOY_CLASSES``)."""
    shape, pattern = _CLASSES[label]
    mask = _shape_mask(shape, size, rng)
    fg, alt, bg = _colours(label, rng)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    texture = pattern(x, y, size / 8 * rng.uniform(0.85, 1.15), rng)[..., None]  # (H, W, 1)
    foreground = texture * fg + (1 - texture) * alt
    background = bg + rng.normal(0, 12, size=(size, size, 3))
    pixels = np.where(mask[..., None], foreground, background)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _write_split(dest: Path, split: str, per_class: int, size: int) -> None:
    """Write ``per_class`` JPEG images of every class; each image has its own seed (order-free)."""
    split_id = _SPLITS.index(split)
    for label, name in enumerate(TOY_CLASSES):
        folder = dest / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([_SEED, split_id, label, i])
            image = render_toy_image(label, size, rng)
            image.save(folder / f"{name}_{i:05d}.JPEG", format="JPEG", quality=90)


def toy_root(config: CfgNode) -> Path:
    """The folder that holds generated toy sets: DATA.TOY_ROOT, or ``<repo>/.cache/toy_data``."""
    if config.DATA.TOY_ROOT:
        return Path(config.DATA.TOY_ROOT)
    return Path(__file__).resolve().parent.parent / ".cache" / "toy_data"


def toy_dataset_dir(root: Path, image_size: int, train_per_class: int, val_per_class: int) -> Path:
    """Where the set with these parameters lives (a new folder whenever a parameter changes)."""
    return root / f"v{_FORMAT_VERSION}_px{image_size}_train{train_per_class}_val{val_per_class}"


def _try_lock(lock: Path) -> bool:
    """Create ``lock`` exclusively (recording host and pid); False when another process holds it."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")
    return True


def _remove_stale_lock(lock: Path) -> None:
    """Remove ``lock`` when it was left by a dead process on this host (e.g. a killed run)."""
    try:
        host, pid = lock.read_text().split()
        os.kill(int(pid), 0)
    except ProcessLookupError:
        if host == socket.gethostname():
            logger.warning("removing stale toy-data lock %s left by dead process %s", lock, pid)
            lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass  # lock gone, half written, or its process alive under another user


def _generate(final: Path, image_size: int, train_per_class: int, val_per_class: int) -> None:
    """Write the set into a temporary folder next to ``final`` and rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_split(tmp, "train", train_per_class, image_size)
        _write_split(tmp, "val", val_per_class, image_size)
        (tmp / _MARKER).touch()
        tmp.chmod(0o755)  # mkdtemp makes it private; the set is shared by every user of the cache
        os.rename(tmp, final)
    except OSError:
        if not (final / _MARKER).exists():
            raise
        logger.info("toy data %s was completed by another process", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_toy_data(
    root: Path,
    image_size: int,
    train_per_class: int,
    val_per_class: int,
    timeout_s: float = 600.0,
    poll_s: float = 0.2,
) -> Path:
    """Return the folder of the toy set, generating it first when no process has done so yet.

    Safe when several processes call it at once: one generates, the others wait for its marker
    (``DataError`` after ``timeout_s``). A finished set is recognised by its marker file.
    """
    final = toy_dataset_dir(root, image_size, train_per_class, val_per_class)
    marker = final / _MARKER
    lock = root / f"{final.name}.lock"
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        # A complete set appears at once (renamed with its marker), so a folder without one is foreign.
        if final.exists() and not marker.exists():
            raise DataError(f"toy data folder {final} is incomplete (no {_MARKER} file); delete it")
        if _try_lock(lock):
            try:
                if not marker.exists():
                    logger.info("generating toy data in %s", final)
                    _generate(final, image_size, train_per_class, val_per_class)
            finally:
                lock.unlink(missing_ok=True)
        elif time.monotonic() > deadline:
            raise DataError(f"toy data {final} not ready after {timeout_s:.0f}s; is {lock} stale?")
        else:
            _remove_stale_lock(lock)
            time.sleep(poll_s)
    return final


def toy_data_path(config: CfgNode) -> Path:
    """The dataset root (with train/ and val/) of the toy set the config asks for, generated if needed."""
    return ensure_toy_data(
        toy_root(config),
        config.DATA.TOY_IMAGE_SIZE,
        config.DATA.TOY_TRAIN_PER_CLASS,
        config.DATA.TOY_VAL_PER_CLASS,
    )
