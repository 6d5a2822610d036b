"""Plot training curves from ``metrics.jsonl`` files, several runs overlaid.

Each line of a ``metrics.jsonl`` (written by the trainer next to its log) is one epoch's JSON record,
e.g. ``{"epoch": 3, "train_loss": 2.1, "lr": 0.001, "acc1": 61.2, "acc5": 84.0, "loss": 1.7,
"max_acc1": 61.2, "epoch_time": 812.0, "images_per_s": 1577.3}`` (``images_per_s``: the whole job's rate;
``acc1_ema`` / ``loss_ema`` with a model EMA). Missing keys, blank lines and a half-written last line are
tolerated. One PNG per plot that has data; runs are labelled by their folder. A path that holds no metrics
file, or one that cannot be read, is a one-line error (exit status 1).

    python tools/plot_metrics.py output/focal_tiny/default output/focal_tiny/long/metrics.jsonl --out plots/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger("plot_metrics")

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class PlotSpec:
    """One output figure: the record keys drawn on it (with their legend names) against the epoch."""

    name: str
    ylabel: str
    keys: tuple[tuple[str, str], ...]  # (record key, legend name)


PLOTS = (
    PlotSpec(
        "loss",
        "loss",
        (("train_loss", "train"), ("loss", "val"), ("val_loss", "val"), ("test_loss", "test"), ("loss_ema", "val EMA")),
    ),
    PlotSpec("lr", "learning rate", (("lr", "lr"),)),
    PlotSpec(
        "accuracy",
        "accuracy (%)",
        (("acc1", "top-1"), ("acc5", "top-5"), ("max_acc1", "best top-1"), ("acc1_ema", "EMA top-1")),
    ),
    PlotSpec("grad_norm", "gradient norm", (("grad_norm", "grad norm"),)),
    PlotSpec("throughput", "training images / s (all processes)", (("images_per_s", "train"),)),
    PlotSpec("epoch_time", "epoch time (s)", (("epoch_time", "epoch time"),)),
)
_LINE_STYLES = ("-", "--", ":", "-.")


def metrics_path(path: Path) -> Path:
    """``path`` itself if it is a file, else the run folder's ``metrics.jsonl``.

    FileNotFoundError when there is none; for a folder above run folders (such as the output root) the
    message names the run folders below it.
    """
    if path.is_dir():
        folder, path = path, path / METRICS_FILE
        runs = sorted(p.parent for p in folder.rglob(METRICS_FILE))
        if not path.is_file() and runs:
            shown = ", ".join(map(str, runs[:3])) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
            raise FileNotFoundError(f"no {METRICS_FILE} in {folder}: give run folders, such as {shown}")
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    return path


def read_metrics(path: Path) -> list[dict]:
    """The JSON records of a metrics file; blank and unreadable lines are skipped (with a warning).

    A file that cannot be read as text at all is an OSError naming it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise OSError(f"cannot read {path}: {reason}") from error
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON, skipped", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_labels(paths: Sequence[Path]) -> list[str]:
    """A label per metrics file: its run folder's name, or more of its path where names repeat."""
    folders = [p.resolve().parent for p in paths]
    labels = [f.name for f in folders]
    depth = 1
    while len(set(labels)) < len(labels) and depth < max(len(f.parts) for f in folders):
        depth += 1
        labels = ["/".join(f.parts[-depth:]) for f in folders]
    if len(set(labels)) < len(labels):  # the same file twice
        labels = [f"{label} ({i})" for i, label in enumerate(labels)]
    return labels


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the records that hold a finite number for it.

    The x value is the record's ``epoch`` when it has one, else its position in the file.
    """
    xs, ys = [], []
    for position, record in enumerate(records):
        value = _number(record.get(key))
        if value is None:
            continue
        epoch = _number(record.get("epoch"))
        xs.append(position if epoch is None else epoch)
        ys.append(value)
    return xs, ys


def draw_spec(spec: PlotSpec, runs: dict[str, list[dict]]) -> Figure | None:
    """The figure of ``spec`` for every run, or None when no run has its keys.

    The legend sits outside the axes, to the right, so it never hides a curve; epochs are whole numbers.
    """
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    drawn = 0
    for run_index, (label, records) in enumerate(runs.items()):
        color = f"C{run_index % 10}"
        keys_drawn = 0
        for key, name in spec.keys:
            xs, ys = series(records, key)
            if not xs:
                continue
            style = _LINE_STYLES[keys_drawn % len(_LINE_STYLES)]
            ax.plot(xs, ys, style, color=color, marker="." if len(xs) < 30 else None, label=f"{label}: {name}")
            keys_drawn += 1
        drawn += keys_drawn
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(spec.ylabel)
    ax.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


def plot_spec(spec: PlotSpec, runs: dict[str, list[dict]], out_path: Path) -> bool:
    """Draw ``spec`` for every run to ``out_path``; False (and no file) when no run has its keys."""
    figure = draw_spec(spec, runs)
    if figure is None:
        return False
    figure.savefig(out_path, dpi=100)
    return True


def plot_runs(runs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """One PNG per plot of ``PLOTS`` that has data in some run; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in PLOTS:
        path = out_dir / f"{spec.name}.png"
        if plot_spec(spec, runs, path):
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Plot the runs named in ``argv``; returns the PNG files written. A missing or unreadable metrics file (or
    output folder) ends the program with a one-line error and exit status 1."""
    parser = argparse.ArgumentParser("plot_metrics.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (holding metrics.jsonl) or jsonl files")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="folder for the PNG files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = [metrics_path(p) for p in args.runs]
        runs = {label: read_metrics(path) for label, path in zip(run_labels(paths), paths)}
        written = plot_runs(runs, args.out)
    except OSError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    for path in written:
        logger.info("wrote %s", path)
    if not written:
        logger.warning("no plottable metrics in %s", ", ".join(map(str, paths)))
    return written


if __name__ == "__main__":
    main()
