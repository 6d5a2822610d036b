"""Checkpoint files that survive crashes and cannot run code when loaded.

* Saving is atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and
  only then renamed over the final name, so a kill at any moment leaves either the old file or the
  new one under that name, never a partial one.
* Loading uses ``torch.load(weights_only=True)``. The only class allowed beyond tensors and plain
  Python containers is ``yacs.config.CfgNode``, because released Swin / Focal checkpoints pickle their
  config. A file that needs anything else is refused with ``UnsafeCheckpointError``.
* ``CheckpointManager`` keeps the newest periodic checkpoints plus ``last.pth`` and ``best.pth``, and
  finds the newest one that still loads when resuming.
* ``.safetensors`` files (a model state dict, written by ``tools/convert_checkpoint.py``, with an
  optional JSON sidecar holding the config and epoch) load through the same function. EMA weights in
  the same file carry the prefix ``model_ema.`` and load as ``{'model_ema': {'model': state_dict}}``.
* RNG state is captured as tensors and Python scalars only, so it loads under ``weights_only`` too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch
from yacs.config import CfgNode

from utils.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingCheckpointError,
    UnsafeCheckpointError,
)
from utils.logger import get_logger

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CorruptCheckpointError",
    "MissingCheckpointError",
    "SAFETENSORS_EMA_PREFIX",
    "UnsafeCheckpointError",
    "capture_rng_state",
    "load_checkpoint_file",
    "restore_rng_state",
    "safetensors_sidecar_path",
    "save_checkpoint_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

_logger = get_logger(__name__)

_PERIODIC_PATTERN = re.compile(r"ckpt_epoch_(\d+)\.pth")
_LAST_NAME = "last.pth"
_BEST_NAME = "best.pth"
_TEMP_SUFFIX = ".tmp"
# Temporary files of checkpoints being written by _write_atomically: ".<name>.pth.<32 hex digits>.tmp".
_TEMP_PATTERN = re.compile(r"\..+\.pth\.[0-9a-f]{32}\.tmp")
_SAFETENSORS_SUFFIX = ".safetensors"
# Keys of a .safetensors file that hold the EMA weights (tools/convert_checkpoint.py writes them).
SAFETENSORS_EMA_PREFIX = "model_ema."


# ----------------------------------------------------------------------------------------------------
# Atomic saving
# ----------------------------------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Publish the bytes ``write`` produces under ``path`` all at once, or not at all."""
    directory = os.path.dirname(os.path.abspath(path))
    # A unique hidden name in the same folder (os.replace is atomic only within one file system).
    # Opened with open(), not tempfile.mkstemp, so the file gets the usual umask permissions, not 0600.
    temp_path = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}{_TEMP_SUFFIX}")
    try:
        with open(temp_path, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_path)
        raise
    _fsync_directory(directory)


def save_checkpoint_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` such that ``path`` never holds a partially written file."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` such that ``path`` never holds a partially written file."""
    _write_atomically(path, lambda f: f.write(data))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` such that ``path`` never holds a partially written file."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _copy_atomic(source: str, path: str) -> None:
    """Copy a finished checkpoint to another name, with the same all-or-nothing guarantee."""

    def write(f: IO[bytes]) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    _write_atomically(path, write)


# ----------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------


class _CfgNodeStandIn:
    """Takes the place of ``yacs.config.CfgNode`` while a checkpoint is unpickled.

    The weights-only unpickler fills (SETITEMS) only exact ``dict`` / ``OrderedDict`` objects, so
    allow-listing the ``dict`` subclass CfgNode itself is not enough. The stand-in builds an
    ``OrderedDict`` instead; unpickling then stores CfgNode's attributes in its ``__dict__``, and
    ``_restore_cfg_nodes`` turns it back into a CfgNode. No CfgNode code runs during unpickling.
    """

    def __new__(cls, *args: object) -> OrderedDict:
        return OrderedDict()


def _is_pickled_cfg_node(obj: object) -> bool:
    return type(obj) is OrderedDict and CfgNode.IMMUTABLE in vars(obj)


def _restore_cfg_nodes(obj: Any) -> Any:
    """``obj`` with every stand-in built for a pickled CfgNode replaced by a real CfgNode."""
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = _restore_cfg_nodes(obj[key])
        if _is_pickled_cfg_node(obj):
            node = CfgNode()
            dict.update(node, obj)
            vars(node).update(vars(obj))
            return node
    elif isinstance(obj, list):
        obj[:] = [_restore_cfg_nodes(value) for value in obj]
    elif isinstance(obj, tuple):
        return tuple(_restore_cfg_nodes(value) for value in obj)
    return obj


def _unsafe_globals(path: str) -> list[str]:
    """The classes and functions the pickle in ``path`` names beyond the allow-list ([] if unreadable)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a damaged file: the caller reports it as corrupt
        return []


def safetensors_sidecar_path(path: str) -> str:
    """The JSON file next to a ``.safetensors`` file that holds its config and epoch: ``name.json``."""
    return path[: -len(_SAFETENSORS_SUFFIX)] + ".json"


def _load_safetensors(path: str, map_location: Any) -> dict[str, Any]:
    """``{'model': state_dict}`` from a safetensors file, plus ``'model_ema'`` when it holds EMA weights and
    the entries of its JSON sidecar if any."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = map_location if isinstance(map_location, str) else str(torch.device(map_location))
    try:
        state_dict = load_file(path, device=device)
    except (SafetensorError, ValueError, EOFError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    checkpoint: dict[str, Any] = {}
    sidecar = safetensors_sidecar_path(path)
    if os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as f:
                metadata = json.load(f)
        except (ValueError, UnicodeDecodeError) as err:
            raise CorruptCheckpointError(f"checkpoint sidecar {sidecar} is not valid JSON: {err}") from err
        if not isinstance(metadata, dict):
            raise CorruptCheckpointError(f"checkpoint sidecar {sidecar} must hold a JSON object")
        checkpoint.update(metadata)
    prefix = SAFETENSORS_EMA_PREFIX
    checkpoint["model"] = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
    ema = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if ema:
        checkpoint["model_ema"] = {"model": ema}
    return checkpoint


def load_checkpoint_file(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Load a ``torch.save`` or ``.safetensors`` file without ever executing code from it.

    ``mmap=True`` maps tensor data lazily instead of reading it, which makes checking a large file
    cheap. Raises ``UnsafeCheckpointError`` when the file needs anything outside the allow-list,
    ``CorruptCheckpointError`` when it is truncated or damaged, ``MissingCheckpointError`` (a
    ``FileNotFoundError``) when missing and ``CheckpointError`` when it is a directory. A ``.safetensors``
    file gives ``{'model': state_dict}`` plus what its JSON sidecar holds.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory; pass a checkpoint file")
    if not os.path.exists(path):
        raise MissingCheckpointError(f"checkpoint {path} does not exist")
    if str(path).endswith(_SAFETENSORS_SUFFIX):
        return _load_safetensors(str(path), map_location)
    safe = torch.serialization.safe_globals([(_CfgNodeStandIn, "yacs.config.CfgNode")])
    try:
        with safe:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (FileNotFoundError, PermissionError, MemoryError):
        raise  # the file may be fine; do not report it as corrupt
    except pickle.UnpicklingError as err:
        with safe:
            unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: its pickle needs {', '.join(unsafe)}, which could "
                "run code; only tensors, plain Python containers and yacs CfgNode are allowed"
            ) from err
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its pickle data cannot be read") from err
    except Exception as err:  # damaged bytes surface as many exception types (zip, EOF, decode, ...)
        raise CorruptCheckpointError(f"checkpoint {path} is corrupt or truncated: {type(err).__name__}: {err}") from err
    return _restore_cfg_nodes(obj)


# ----------------------------------------------------------------------------------------------------
# Checkpoint folder management
# ----------------------------------------------------------------------------------------------------


def _periodic_epoch(name: str) -> int | None:
    match = _PERIODIC_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """The checkpoints of one run: ``ckpt_epoch_{N}.pth`` (newest ``keep``), ``last.pth``, ``best.pth``.

    Only rank 0 should save. Each save is atomic; periodic files beyond the newest ``keep`` are
    deleted after a successful save.
    """

    def __init__(self, output_dir: str, keep: int = 3, logger: logging.Logger | None = None) -> None:
        if keep < 0:
            raise ConfigError(f"keep (SAVE_KEEP) must be >= 0, got {keep}")
        self.output_dir = output_dir
        self.keep = keep
        self.logger = logger or _logger
        os.makedirs(output_dir, exist_ok=True)
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """Delete temporary files left by a save that was killed (they never hold a valid name)."""
        for name in os.listdir(self.output_dir):
            if _TEMP_PATTERN.fullmatch(name):
                self.logger.warning("removing %s, left by an interrupted save", name)
                with contextlib.suppress(FileNotFoundError):  # another rank may have removed it first
                    os.remove(os.path.join(self.output_dir, name))

    def periodic_paths(self) -> list[str]:
        """The periodic checkpoints present, oldest epoch first."""
        epochs = sorted(epoch for epoch in map(_periodic_epoch, os.listdir(self.output_dir)) if epoch is not None)
        return [os.path.join(self.output_dir, f"ckpt_epoch_{epoch}.pth") for epoch in epochs]

    def save(self, state: dict[str, Any], epoch: int, is_best: bool = False, periodic: bool = True) -> list[str]:
        """Write ``state`` (with ``epoch`` stored under 'epoch') and return the paths written.

        ``periodic`` (the caller applies SAVE_FREQ) adds ``ckpt_epoch_{epoch}.pth``; ``last.pth`` is
        always written and ``best.pth`` when ``is_best``.
        """
        record = dict(state, epoch=epoch)
        # last.pth is written last, so on equal epochs latest_valid (newest mtime) resumes from it.
        names = ([f"ckpt_epoch_{epoch}.pth"] if periodic else []) + ([_BEST_NAME] if is_best else [])
        names.append(_LAST_NAME)
        paths = [os.path.join(self.output_dir, name) for name in names]
        save_checkpoint_atomic(record, paths[0])
        for path in paths[1:]:
            _copy_atomic(paths[0], path)
        self.logger.info("saved epoch %d checkpoint to %s", epoch, ", ".join(names))
        self._prune()
        return paths

    def _prune(self) -> None:
        periodic = self.periodic_paths()
        for path in periodic[: max(0, len(periodic) - self.keep)]:
            os.remove(path)
            self.logger.info("removed old checkpoint %s", path)

    def _candidates(self) -> list[str]:
        names = os.listdir(self.output_dir)
        return [
            os.path.join(self.output_dir, name)
            for name in names
            if name in (_LAST_NAME, _BEST_NAME) or _periodic_epoch(name) is not None
        ]

    def _load_or_warn(self, path: str, mmap: bool) -> Any | None:
        try:
            return load_checkpoint_file(path, mmap=mmap)
        except CorruptCheckpointError as err:
            self.logger.warning("skipping it: %s", err)  # the message names the file
            return None

    def latest_valid(self) -> tuple[str, dict[str, Any]] | None:
        """(path, state) of the newest checkpoint that loads, or None when there is none.

        Newest means the highest stored 'epoch', then 'step' (the batches done within that epoch, which
        a mid-epoch checkpoint has fewer of than the end-of-epoch one), then modification time. Corrupt or
        truncated files are skipped with a warning naming them; an unsafe file raises
        ``UnsafeCheckpointError`` (it needs a human, not a silent fallback to an older file).
        Damage inside tensor data is not detectable (the format stores no checksums).
        """
        ranked = []
        for path in self._candidates():
            # Memory-mapped: reads the pickle (and checks the file's structure) without the tensor data.
            header = self._load_or_warn(path, mmap=True)
            if isinstance(header, dict):
                key = (int(header.get("epoch", -1)), int(header.get("step", -1)), os.path.getmtime(path))
                ranked.append((key, path))
            elif header is not None:
                self.logger.warning("skipping checkpoint %s: it does not hold a dict", path)
        for _, path in sorted(ranked, reverse=True):
            state = self._load_or_warn(path, mmap=False)
            if state is not None:
                return path, state
        return None


# ----------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The RNG state of torch (CPU and the current CUDA device), numpy and ``random`` in this process.

    Only tensors and Python ints / floats / tuples are stored, so it survives weights-only loading.
    Only the current CUDA device is read: reading the others would create a CUDA context on each GPU
    from every process of a multi-GPU run.
    """
    _, np_keys, np_pos, np_has_gauss, np_cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``capture_rng_state`` captured, so the same random numbers follow."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda_states = state.get("cuda")
    if cuda_states is None or not torch.cuda.is_available():
        return
    if isinstance(cuda_states, torch.Tensor):  # the current device's state
        torch.cuda.set_rng_state(cuda_states)
        return
    if len(cuda_states) != torch.cuda.device_count():  # older checkpoints: one state per device
        _logger.warning(
            "not restoring CUDA RNG state: saved for %d devices, %d visible",
            len(cuda_states),
            torch.cuda.device_count(),
        )
        return
    torch.cuda.set_rng_state_all(cuda_states)
