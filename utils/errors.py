"""The project's error types: what ``main.py`` reports as one line instead of a traceback.

Every error here means bad input (a config value, a data folder, a checkpoint) or a run that cannot go on
(a non-finite loss, a collective that failed because another rank died). ``main.py`` reports a
``FocalError`` in one line with exit status 1 and writes its traceback to the rank's log file only; any
other exception is a bug and keeps its traceback. Each class also keeps the builtin base its raise sites
had before (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so callers that catch those still work.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "ConfigError",
    "CorruptCheckpointError",
    "CorruptImageError",
    "DataError",
    "FocalError",
    "MissingCheckpointError",
    "MissingDataError",
    "NonFiniteLossError",
    "ToolError",
    "UnsafeCheckpointError",
    "one_line_exit",
    "run_tool",
]


class FocalError(Exception):
    """Bad input or a failed run: main.py reports it in one line (exit 1) and logs the traceback to the rank's
    log file only."""


class ConfigError(FocalError, ValueError):
    """A config file, override or flag that cannot be applied; the message names the key."""


class CheckpointError(FocalError, RuntimeError):
    """A checkpoint file that cannot be loaded; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle needs classes or functions outside the allow-list (it could run code)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that is truncated, damaged or not a ``torch.save`` file at all."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class DataError(FocalError, ValueError):
    """A dataset that cannot be used as it is (a bad map file, splits with different classes); the message
    names the file or folder."""


class CorruptImageError(DataError):
    """An image file that cannot be read or decoded; the message names the file."""


class MissingDataError(FocalError, FileNotFoundError):
    """A file or folder of the dataset that does not exist (or holds no images); the message names it."""


class NonFiniteLossError(FocalError, RuntimeError):
    """Training produced a NaN/inf loss; the message names the epoch and step."""


class CollectiveError(FocalError, RuntimeError):
    """A collective failed, most likely because another rank died or timed out."""


class ToolError(FocalError):
    """Bad input to a command-line tool (``tools/``), or a check it failed: one line on stderr, exit ``status``
    (2 for flags, 1 for files and failed checks)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def one_line_exit(program: str) -> Iterator[None]:
    """Around a tool's work: a ``ToolError`` ends the program with ``program: error: message`` and its status."""
    try:
        yield
    except ToolError as error:
        sys.stderr.write(f"{program}: error: {error}\n")
        raise SystemExit(error.status) from None


def run_tool(program: str, work: Callable[[Any], T], args: Any) -> T:
    """A tool's ``main``: log to stderr, run ``work(args)``; a ``ToolError`` is one line and its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_exit(program):
        return work(args)
