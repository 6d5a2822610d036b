"""Export with a dynamic batch: torch.export and ONNX (onnxruntime) match eager at batch sizes other than the traced
one, for v1 and v2; tools/export.py writes both from a checkpoint and checks them before it reports success."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from golden import FIXTURES, load_fixture
from safetensors.torch import save_file
from yacs.config import CfgNode

import config
import models
from tools import export as export_tool

V1, V2 = "focal_tiny_patch4_window7_224", "focalv2_tiny_useconv_patch4_window7_224"
TINY = {
    V1: dict(img_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), drop_path_rate=0.0, num_classes=10),
    V2: dict(
        img_size=64,
        embed_dim=8,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        drop_path_rate=0.0,
        num_classes=10,
        window_size=4,
        focal_topK=16,
    ),
}


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **TINY[name]).eval()


def batch(size: int, side: int = 64) -> torch.Tensor:
    return torch.randn(size, 3, side, side, generator=torch.Generator().manual_seed(size))


def cli(*args: str) -> dict:
    return export_tool.main([*args])


def tiny_flags(name: str) -> list[str]:
    """--model and --model-args of the tiny ``name``."""
    return ["--model", name, "--model-args", json.dumps(TINY[name])]


def test_cli_exports_a_released_v1_checkpoint_and_both_files_run_at_other_batch_sizes(tmp_path):
    """A released-layout file ({'model', 'config': CfgNode}, derived buffers included) of a golden fixture."""
    fixture = load_fixture(FIXTURES / "golden" / "p04_pool_conv_conv_embed_128.pt")
    checkpoint = tmp_path / "released.pth"
    torch.save({"model": fixture["state_dict"], "config": CfgNode({"MODEL": CfgNode({"TYPE": "focal"})})}, checkpoint)
    model_args = json.dumps(fixture["kwargs"])
    written = cli(
        "--model", V1, "--model-args", model_args, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "v1")
    )
    assert written == {"pt2": tmp_path / "v1.pt2", "onnx": tmp_path / "v1.onnx"}
    model = models.load_official_weights(timm.create_model(V1, **fixture["kwargs"]), fixture["state_dict"]).eval()
    images = batch(4, 128)
    with torch.no_grad():
        expected = model(images)
        exported = torch.export.load(str(written["pt2"])).module()(images)
    assert (exported - expected).abs().max().item() < 1e-4
    assert (export_tool.onnx_logits(written["onnx"], images) - expected).abs().max().item() < 1e-3
    released = torch.export.load(str(written["pt2"])).module()(fixture["input"].float())
    assert (released - fixture["logits_fp32"]).abs().max().item() < 1e-4  # the released implementation's logits


def test_cli_exports_our_v2_safetensors_checkpoint(tmp_path):
    model = tiny(V2)
    checkpoint = tmp_path / "ours.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    written = cli(*tiny_flags(V2), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "v2"))
    images = batch(1)
    with torch.no_grad():
        expected = model(images)
        assert (torch.export.load(str(written["pt2"])).module()(images) - expected).abs().max().item() < 1e-4
    assert (export_tool.onnx_logits(written["onnx"], images) - expected).abs().max().item() < 1e-3


def test_cli_exports_a_training_run_from_its_config(tmp_path):
    cfg = config.get_default_config()
    config.merge_config_file(cfg, "configs/demo.yaml")
    torch.manual_seed(0)
    model = models.build_model(cfg).eval()
    checkpoint = tmp_path / "best.pth"
    torch.save({"model": model.state_dict(), "config": cfg.dump(), "epoch": 3}, checkpoint)
    written = cli(
        "--cfg",
        "configs/demo.yaml",
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "demo"),
        "--formats",
        "pt2",
    )
    assert list(written) == ["pt2"] and not (tmp_path / "demo.onnx").exists()
    images = batch(6, cfg.DATA.IMG_SIZE)
    with torch.no_grad():
        assert (torch.export.load(str(written["pt2"])).module()(images) - model(images)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--checkpoint", "missing.pth"], 1, "--checkpoint missing.pth does not exist"),
        (["--batch-size", "3", "--check-batch-size", "3"], 2, "--check-batch-size another positive size"),
        (["--batch-size", "1"], 2, "--batch-size must be at least 2"),
    ],
    ids=["missing_checkpoint", "same_batch", "batch_of_one"],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, status, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(*tiny_flags(V1), "--output", str(tmp_path / "m"), *args)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.glob("m.*"))


def test_cli_names_a_checkpoint_of_another_model(tmp_path, capsys):
    checkpoint = tmp_path / "other.pth"
    torch.save(timm.create_model(V1, **dict(TINY[V1], embed_dim=16)).state_dict(), checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        cli(*tiny_flags(V1), "--checkpoint", str(checkpoint), "--output", str(tmp_path / "m"))
    assert exit_info.value.code == 1
    assert "shape mismatches: patch_embed.proj.weight (16, 3, 4, 4) vs model (8, 3, 4, 4)" in capsys.readouterr().err


def test_cli_fails_when_the_exported_outputs_differ_from_eager(tmp_path, capsys, monkeypatch):
    """The check compares with eager: a program of other weights is refused, and nothing is written."""
    other = tiny(V1)
    torch.nn.init.normal_(other.head.bias)
    real = export_tool.export_program
    monkeypatch.setattr(export_tool, "export_program", lambda model, example: real(other, example))
    with pytest.raises(SystemExit) as exit_info:
        cli(*tiny_flags(V1), "--output", str(tmp_path / "m"))
    assert exit_info.value.code == 1
    assert "the exported program differs from eager by" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))
