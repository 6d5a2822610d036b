"""Copy the golden fixtures the tests read from ../shared/reference into tests/fixtures.

Keeps only the fields the tests use (constructor kwargs, released state_dict, input, fp32/fp64 logits,
fp64 parameter gradients), so the repository stays small. Run once after the reference data changes:

    python tools/make_test_fixtures.py --reference ../shared/reference
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

KEPT_FIELDS = ("kwargs", "state_dict", "input", "logits_fp32", "logits_fp64", "grads_fp64")
logger = logging.getLogger("make_test_fixtures")


def slim_fixture(source: Path, target: Path) -> None:
    """Write ``source`` to ``target`` with only ``KEPT_FIELDS`` (and no image gradient)."""
    data = torch.load(source, weights_only=True)
    slim = {key: data[key] for key in KEPT_FIELDS}
    slim["grads_fp64"] = {k: v for k, v in slim["grads_fp64"].items() if k != "input"}
    torch.save(slim, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/reference"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for folder in ("golden", "golden_v2", "state_dict_keys"):
        source_dir = args.reference / folder
        if not source_dir.is_dir():
            logger.info("skipping %s (not found)", source_dir)
            continue
        target_dir = args.out / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(source_dir.iterdir()):
            if source.suffix == ".pt":
                slim_fixture(source, target_dir / source.name)
            elif source.suffix == ".json":
                shutil.copyfile(source, target_dir / source.name)
            logger.info("wrote %s", target_dir / source.name)


if __name__ == "__main__":
    main()
