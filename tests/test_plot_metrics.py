"""tools/plot_metrics.py: one-line errors for paths without readable metrics, EMA curves, legend and epoch ticks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import plot_metrics

ROWS = [dict(epoch=e, train_loss=2 - e, loss=2.5 - e, acc1=10 + e, acc1_ema=9 + e, loss_ema=2.4 - e) for e in range(2)]


def _run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return folder


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        plot_metrics.main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics.py: error: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_output_root_is_a_one_line_error_naming_the_run_folders_below_it(tmp_path, capsys):
    for name in ("a", "b"):
        _run(tmp_path / "output" / "model" / name)
    err = _one_line_error(capsys, [str(tmp_path / "output"), "--out", str(tmp_path / "plots")])
    assert f"no metrics.jsonl in {tmp_path / 'output'}" in err
    assert str(tmp_path / "output" / "model" / "a") in err and str(tmp_path / "output" / "model" / "b") in err


def test_a_missing_or_unreadable_metrics_file_is_a_one_line_error_naming_it(tmp_path, capsys):
    err = _one_line_error(capsys, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "plots")])
    assert f"no metrics file at {tmp_path / 'nowhere'}" in err
    binary = tmp_path / "metrics.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    err = _one_line_error(capsys, [str(binary), "--out", str(tmp_path / "plots")])
    assert f"cannot read {binary}" in err


def _figure(spec_name: str, runs: dict[str, list[dict]]):
    spec = next(spec for spec in plot_metrics.PLOTS if spec.name == spec_name)
    figure = plot_metrics.draw_spec(spec, runs)
    figure.canvas.draw()
    return figure


def test_ema_accuracy_and_loss_are_drawn():
    accuracy = _figure("accuracy", {"run": ROWS}).axes[0]
    assert {line.get_label() for line in accuracy.get_lines()} == {"run: top-1", "run: EMA top-1"}
    loss = _figure("loss", {"run": ROWS}).axes[0]
    assert "run: val EMA" in {line.get_label() for line in loss.get_lines()}


def test_the_legend_does_not_cover_the_curves_and_epochs_are_whole_numbers():
    figure = _figure("accuracy", {"baseline": ROWS, "longer run": ROWS})
    ax = figure.axes[0]
    legend = figure.legends[0] if figure.legends else ax.get_legend()
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert ticks == [0.0, 1.0]
