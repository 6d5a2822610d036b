"""tools/plot_metrics.py and tools/visualize_attention.py: PNGs written, attention weights exact."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from tiny_models import TINY_FOCAL, tiny_focal

from models import FocalTransformer
from tools import plot_metrics, visualize_attention
from tools.visualize_attention import (
    capture_block_inputs,
    gather_keys_values,
    generated_image,
    key_weights,
    query_attention,
    wrapped_spans,
)

# Focal level 3 at stage 0: two pooled levels there.
TINY = dict(TINY_FOCAL, focal_levels=(3, 2, 2, 2))


def tiny_model(**overrides) -> FocalTransformer:
    model = tiny_focal(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # sharper, less uniform attention than the init gives
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name or "qkv.weight" in name:
                param.normal_(std=0.5)
    return model


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- plot_metrics ---------------------------------------------------------------------------------------
def test_plot_metrics_overlays_two_runs(tmp_path):
    full = [
        json.dumps(
            dict(epoch=e, train_loss=3 - 0.2 * e, loss=2.5 - 0.2 * e, lr=1e-3 * (e + 1), acc1=10.0 * e, acc5=15.0 * e)
            | dict(max_acc1=10.0 * e, epoch_time=60.0, images_per_s=1200.0 + e, grad_norm=1.5)
        )
        for e in range(6)
    ]
    partial = [  # keys missing here and there, a blank line, a non-number and a half-written last line
        json.dumps(dict(epoch=0, train_loss=2.9, lr=5e-4)),
        "",
        json.dumps(dict(epoch=1, train_loss=2.7, lr=1e-3, acc1=12.5, acc5=None)),
        json.dumps(dict(epoch=2, train_loss="nan?", lr=1e-3, acc1=20.0)),
        '{"epoch": 3, "train_lo',
    ]
    run_a = write_jsonl(tmp_path / "runs" / "baseline" / "metrics.jsonl", full)
    write_jsonl(tmp_path / "runs" / "longer" / "metrics.jsonl", partial)
    out = tmp_path / "plots"
    written = plot_metrics.main([str(run_a), str(tmp_path / "runs" / "longer"), "--out", str(out)])
    names = {p.name for p in written}
    assert {"loss.png", "lr.png", "accuracy.png", "throughput.png", "epoch_time.png", "grad_norm.png"} == names
    for path in written:
        assert_png(path)


def test_read_metrics_is_tolerant_and_series_skip_missing_values(tmp_path):
    path = write_jsonl(tmp_path / "run" / "metrics.jsonl", ['{"epoch": 0, "acc1": 1.0}', "oops", '{"acc1": 2.0}'])
    records = plot_metrics.read_metrics(path)
    assert records == [{"epoch": 0, "acc1": 1.0}, {"acc1": 2.0}]
    assert plot_metrics.series(records, "acc1") == ([0.0, 1], [1.0, 2.0])
    assert plot_metrics.series(records, "acc5") == ([], [])


def test_run_labels_use_the_folder_and_disambiguate():
    paths = [Path("/a/x/run1/metrics.jsonl"), Path("/a/y/run1/metrics.jsonl"), Path("/a/y/run2/metrics.jsonl")]
    assert plot_metrics.run_labels(paths) == ["x/run1", "y/run1", "y/run2"]
    assert plot_metrics.run_labels(paths[1:]) == ["run1", "run2"]


def test_plot_metrics_without_plottable_keys_writes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "run" / "metrics.jsonl", ['{"epoch": 0, "note": "hello"}'])
    assert plot_metrics.main([str(path), "--out", str(tmp_path / "plots")]) == []
    with pytest.raises(FileNotFoundError):
        plot_metrics.metrics_path(tmp_path / "missing")


# ---- visualize_attention --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, dict(use_shift=True, focal_pool="conv")], ids=["plain", "shift_conv"])
def test_visualize_attention_writes_a_png_per_stage_with_normalised_weights(tmp_path, overrides):
    model = tiny_model(**overrides)
    results = visualize_attention.visualize_attention(model, generated_image(64), (5, 60), tmp_path)
    assert [qa.stage for qa in results] == [0, 1, 2, 3]
    for qa in results:
        assert_png(tmp_path / f"stage{qa.stage}.png")
        torch.testing.assert_close(qa.weights.sum(-1), torch.ones(qa.weights.shape[0]))
        kw = key_weights(qa)
        total = kw.fine_total + sum(kw.pooled_totals) + kw.zero_slot
        assert total == pytest.approx(1.0, abs=1e-5)
        assert float(kw.fine.sum()) == pytest.approx(kw.fine_total, abs=1e-5)
    assert len(key_weights(results[0]).pooled) == 2  # focal level 3 at stage 0: two pooled levels


@pytest.mark.parametrize("overrides", [{}, dict(use_shift=True)], ids=["plain", "shift"])
@pytest.mark.parametrize("pixel", [(0, 0), (37, 50), (63, 63)])
def test_recomputed_weights_reproduce_the_block_attention_output(overrides, pixel):
    model = tiny_model(**overrides)
    blocks = [stage.blocks[-1] for stage in model.layers]
    outputs = {}
    handles = [
        block.attn.register_forward_hook(lambda _m, _a, out, i=i: outputs.setdefault(i, out))
        for i, block in enumerate(blocks)
    ]
    captures = capture_block_inputs(model, torch.randn(1, 3, 64, 64), blocks)
    for handle in handles:
        handle.remove()
    for stage, (block, capture) in enumerate(zip(blocks, captures)):
        qa = query_attention(block, capture, pixel, 4 * 2**stage, stage, len(model.layers[stage].blocks) - 1)
        _, v = gather_keys_values(block.attn, capture.x, capture.pooled, qa.key_index)  # (nH, N, hd)
        mixed = torch.einsum("hn,hnd->hd", qa.weights, v).reshape(-1)
        Hp, Wp = qa.padded_size
        row = (qa.token[0] - qa.shift_size) % Hp
        col = (qa.token[1] - qa.shift_size) % Wp
        torch.testing.assert_close(block.attn.proj(mixed), outputs[stage][0, row, col], rtol=1e-5, atol=1e-5)


def test_wrapped_spans():
    assert wrapped_spans(2, 4, 8) == [(2, 6)]
    assert wrapped_spans(6, 4, 8) == [(6, 8), (0, 2)]
    assert wrapped_spans(9, 4, 8) == [(1, 5)]


def test_visualize_attention_cli_with_config_and_checkpoint(tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    first = visualize_attention.main(["--cfg", str(config), "--query", "12", "20", "--out", str(tmp_path / "cfg")])
    assert len(first) == 4 and all((tmp_path / "cfg" / f"stage{i}.png").is_file() for i in range(4))

    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model": tiny_model(img_size=32).state_dict()}, checkpoint)
    args = ["--model", "focal_tiny_patch4_window7_224", "--model-args", json.dumps(dict(TINY, img_size=48))]
    args += ["--checkpoint", str(checkpoint), "--query", "30", "7", "--out", str(tmp_path / "named")]
    results = visualize_attention.main(args)
    assert results[0].map_size == (12, 12)
    assert all((tmp_path / "named" / f"stage{i}.png").is_file() for i in range(4))


def _visualize_error(capsys, args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of visualize_attention's command line when it refuses its input."""
    with pytest.raises(SystemExit) as exit_:
        visualize_attention.main(args)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("visualize_attention: error: "), err
    return exit_.value.code, err


@pytest.fixture
def tiny_cli(tmp_path) -> list[str]:
    """Command-line arguments for the tiny model at 48 px, a valid query and an output folder."""
    args = ["--model", "focal_tiny_patch4_window7_224", "--model-args", json.dumps(dict(TINY, img_size=48))]
    return args + ["--query", "30", "7", "--out", str(tmp_path / "out")]


def test_visualize_attention_names_a_checkpoint_of_another_model(tmp_path, capsys, tiny_cli):
    checkpoint = tmp_path / "other.pth"
    torch.save({"model": tiny_model(embed_dim=8, num_heads=(1, 1, 2, 2)).state_dict()}, checkpoint)
    status, err = _visualize_error(capsys, [*tiny_cli, "--checkpoint", str(checkpoint)])
    assert status == 1
    assert f"checkpoint {checkpoint} is not of this model" in err and "patch_embed.proj.weight (8, 3, 4, 4)" in err
    assert not (tmp_path / "out").exists()


def test_visualize_attention_names_a_missing_image(tmp_path, capsys, tiny_cli):
    status, err = _visualize_error(capsys, [*tiny_cli, "--image", str(tmp_path / "cat.jpg")])
    assert status == 1 and f"--image {tmp_path / 'cat.jpg'} does not exist" in err


def test_visualize_attention_points_a_run_root_to_its_checkpoints(tmp_path, capsys, tiny_cli):
    run = tmp_path / "output" / "focal_demo_patch2_window4_32" / "default"
    run.mkdir(parents=True)
    torch.save({"model": tiny_model(img_size=32).state_dict()}, run / "best.pth")
    torch.save({"model": tiny_model(img_size=32).state_dict()}, run / "last.pth")
    for folder in (tmp_path / "output", run):
        status, err = _visualize_error(capsys, [*tiny_cli, "--checkpoint", str(folder)])
        assert status == 2
        assert f"--checkpoint {folder} is a folder: pass a checkpoint file (it holds 2, e.g. {run / 'best.pth'})" in err
