"""Run logging: one plain log file per rank, and a coloured console on rank 0 only.

Modules log through ``get_logger(__name__)``, which places them under the ``focal`` logger, so the
handlers that ``create_logger`` attaches there receive their records too.
"""

from __future__ import annotations

import logging
import os
import sys

from termcolor import colored

__all__ = ["ROOT_LOGGER_NAME", "create_logger", "get_logger"]

ROOT_LOGGER_NAME = "focal"

_PLAIN_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_COLOR_FORMAT = (
    colored("[%(asctime)s %(name)s]", "green")
    + colored(" (%(filename)s %(lineno)d)", "yellow")
    + ": %(levelname)s %(message)s"
)
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Marks the handlers this module attached, so a second call replaces them instead of doubling them.
_HANDLER_TAG = "_focal_run_handler"


def get_logger(module_name: str) -> logging.Logger:
    """The logger for ``module_name`` inside the ``focal`` hierarchy."""
    return logging.getLogger(ROOT_LOGGER_NAME).getChild(module_name)


def _tagged(handler: logging.Handler, fmt: str, level: int) -> logging.Handler:
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(fmt, datefmt=_DATE_FORMAT))
    setattr(handler, _HANDLER_TAG, True)
    return handler


def create_logger(output_dir: str, dist_rank: int = 0, name: str = ROOT_LOGGER_NAME) -> logging.Logger:
    """Configure and return logger ``name``: ``output_dir/log_rank{rank}.txt`` plus, on rank 0, stdout.

    The file gets every record (DEBUG and up); the console gets INFO and up.

    Calling it again (for example with another ``output_dir``) replaces the handlers it attached
    before, so records are never written twice.
    """
    os.makedirs(output_dir, exist_ok=True)
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_TAG, False)]:
        logger.removeHandler(handler)
        handler.close()
    if dist_rank == 0:
        logger.addHandler(_tagged(logging.StreamHandler(sys.stdout), _COLOR_FORMAT, logging.INFO))
    log_path = os.path.join(output_dir, f"log_rank{dist_rank}.txt")
    file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    logger.addHandler(_tagged(file_handler, _PLAIN_FORMAT, logging.DEBUG))
    return logger
