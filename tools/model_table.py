"""Parameters and FLOPs of every registered Focal variant, next to the figures the paper reports.

Each variant is built once at its registered size; every column is a ``Column`` (a header and a function
of the built model), so a measured column (throughput, memory) is one more entry in ``COLUMNS`` or in the
``columns`` argument of ``build_row`` / ``build_table``.

Examples::

    python tools/model_table.py
    python tools/model_table.py --variants focal_tiny_patch4_window7_224 --json table.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402  (registers the Focal variants in timm's registry)
from tools.benchmark import BenchSettings, make_step, time_interleaved  # noqa: E402

logger = logging.getLogger("model_table")

# Params (M) and GFLOPs of the paper (Yang et al. 2021, Table 2 and the released README).
PAPER: dict[str, tuple[float, float]] = {
    "focal_tiny_patch4_window7_224": (28.9, 4.9),
    "focal_small_patch4_window7_224": (51.1, 9.4),
    "focal_base_patch4_window7_224": (89.8, 16.4),
    "focal_tiny_useconv_patch4_window7_224": (30.8, 5.2),
    "focal_small_useconv_patch4_window7_224": (53.1, 9.7),
    "focal_base_useconv_patch4_window7_224": (93.3, 16.8),
}


@dataclass(frozen=True)
class Column:
    """One table column: ``value(name, model)`` gives the cell; ``fmt`` turns it into markdown text."""

    header: str
    value: Callable[[str, nn.Module], Any]
    fmt: str = "{}"

    def text(self, cell: Any) -> str:
        return "-" if cell is None else self.fmt.format(cell)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _paper(index: int) -> Callable[[str, nn.Module], float | None]:
    def value(name: str, model: nn.Module) -> float | None:
        return PAPER[name][index] if name in PAPER else None

    return value


COLUMNS: list[Column] = [
    Column("model", lambda name, model: name),
    Column("params (M)", lambda name, model: num_params(model) / 1e6, "{:.2f}"),
    Column("params", lambda name, model: num_params(model), "{:,}"),
    Column("GFLOPs", lambda name, model: model.flops() / 1e9, "{:.2f}"),
    Column("paper params (M)", _paper(0), "{:.1f}"),
    Column("paper GFLOPs", _paper(1), "{:.1f}"),
]


def throughput_column(settings: BenchSettings, mode: str = "infer") -> Column:
    """Measured images/s of each variant (median of ``settings.iters`` timed steps, tools/benchmark.py)."""

    def value(name: str, model: nn.Module) -> float:
        img_size = settings.img_size[0]
        step = make_step(model.to(settings.device), mode, settings.batch_size, img_size, settings)
        times = sorted(time_interleaved({name: step}, settings)[name])
        return settings.batch_size / times[len(times) // 2]

    header = f"{mode} img/s ({settings.device} {settings.dtype}, batch {settings.batch_size})"
    return Column(header, value, "{:.1f}")


def build_row(name: str, columns: Sequence[Column] = COLUMNS, **model_kwargs: Any) -> dict[str, Any]:
    """Build variant ``name`` (with ``model_kwargs`` overrides) and evaluate every column: {header: value}."""
    model = timm.create_model(name, **model_kwargs).eval()
    return {column.header: column.value(name, model) for column in columns}


def build_table(names: Sequence[str], columns: Sequence[Column] = COLUMNS, **model_kwargs: Any) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        logger.info("building %s", name)
        rows.append(build_row(name, columns, **model_kwargs))
    return rows


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[Column] = COLUMNS) -> str:
    """A markdown table with one line per row, cells formatted by their column."""
    lines = [
        "| " + " | ".join(column.header for column in columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(column.text(row[column.header]) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=list(models.FOCAL_VARIANTS), help="registered names (default: all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows (raw values) to this file")
    parser.add_argument("--throughput", action="store_true", help="add measured inference images/s (224)")
    parser.add_argument("--device", default="cpu", help="device of the throughput column (cpu, cuda)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="throughput dtype")
    parser.add_argument("--batch-size", type=int, default=8, help="throughput batch size")
    parser.add_argument("--iters", type=int, default=7, help="timed iterations (median reported)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in models.FOCAL_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; registered: {sorted(models.FOCAL_VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    columns = list(COLUMNS)
    if args.throughput:
        settings = BenchSettings(
            models=args.variants, baseline=[], img_size=[224], mode=["infer"], batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, iters=args.iters, warmup=2,
        )  # fmt: skip
        columns.append(throughput_column(settings))
    rows = build_table(args.variants, columns)
    sys.stdout.write(to_markdown(rows, columns))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
