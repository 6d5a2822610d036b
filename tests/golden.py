"""Shared access to the golden fixtures (data produced by the released implementation)."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_paths(folder: str) -> list[Path]:
    return sorted((FIXTURES / folder).glob("*.pt"))


def load_fixture(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (the fixtures' gradient tolerance)."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
