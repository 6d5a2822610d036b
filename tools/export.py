"""Export a Focal model with a dynamic batch dimension: ``torch.export`` (.pt2) and ONNX (.onnx), checked against eager.

    python tools/export.py --model focal_tiny_patch4_window7_224 --checkpoint focal-tiny-is.pth \\
        --output exported/focal_tiny
    python tools/export.py --cfg output/focal_demo_patch2_window4_32/default/config.yaml \\
        --checkpoint output/focal_demo_patch2_window4_32/default/best.pth --output exported/demo

The model is built from a registered name (``--model``, with ``--model-args`` JSON overrides) or from a config file
(``--cfg``, e.g. the ``config.yaml`` a training run writes), and the checkpoint (ours or released, ``.pth`` or
``.safetensors``) is loaded strictly and without running code from it. The model is exported in eval mode, fp32, on
the CPU, traced at ``--batch-size`` with the batch dimension dynamic; the attention takes its reference path (gathered
keys, one ``scaled_dot_product_attention``), which holds no loop over the images of the batch. Before success is
reported, the exported program and the ONNX model (run in onnxruntime) are compared with the eager model at another
batch size, ``--check-batch-size``: the largest absolute difference of the logits must stay within ``--atol`` (.pt2)
and ``--onnx-atol`` (.onnx). Writes ``<output>.pt2`` and ``<output>.onnx``; load the first with
``torch.export.load(path).module()``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tools.model_flags import model_from_flags  # noqa: E402
from utils.errors import ToolError, run_tool  # noqa: E402

logger = logging.getLogger("export")

FORMATS = ("pt2", "onnx")


class ExportError(ToolError):
    """Bad input, or an export whose outputs differ from eager: reported in one line with ``status``."""


def build_model(args: argparse.Namespace) -> nn.Module:
    """The model ``--model`` / ``--cfg`` names, with ``--checkpoint`` loaded strictly, in eval mode."""
    import models
    from models.checkpoint_loading import CheckpointMismatchError
    from utils.checkpoint import CheckpointError, load_checkpoint_file

    model = model_from_flags(args)
    if args.checkpoint:
        try:
            models.load_official_weights(model, load_checkpoint_file(str(args.checkpoint)))
        except FileNotFoundError:
            raise ExportError(f"--checkpoint {args.checkpoint} does not exist") from None
        except (CheckpointMismatchError, CheckpointError) as error:
            raise ExportError(f"--checkpoint {args.checkpoint}: {error}") from None
    return model.eval()


def model_input_size(model: nn.Module) -> int:
    """The square input side the model was built for."""
    return model.patches_resolution[0] * model.patch_embed.proj.stride[0]


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` traced on ``example`` (B, C, H, W), the batch dimension dynamic."""
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})


def export_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """ONNX (the dynamo exporter) of an exported program, its dynamic batch kept, written to ``path``."""
    torch.onnx.export(program, f=str(path), dynamo=True, verbose=False)


def onnx_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    """The logits of the ONNX model at ``path`` for ``images``, computed by onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return torch.from_numpy(output)


def check(what: str, actual: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    """The largest absolute difference of ``actual`` from ``expected``; an ExportError above ``atol``."""
    if actual.shape != expected.shape:
        raise ExportError(f"{what} gives logits of shape {tuple(actual.shape)}, eager {tuple(expected.shape)}")
    error = (actual - expected).abs().max().item()
    if not error <= atol:
        raise ExportError(f"{what} differs from eager by {error:.2e} (allowed {atol:.0e})")
    return error


def export(args: argparse.Namespace) -> dict[str, Path]:
    """Write the formats the flags ask for, each checked against eager at ``--check-batch-size``; their paths."""
    if args.checkpoint and args.checkpoint.is_dir():
        raise ExportError(f"--checkpoint {args.checkpoint} is a folder: pass a checkpoint file", status=2)
    if args.batch_size < 2 or args.check_batch_size < 1 or args.check_batch_size == args.batch_size:
        raise ExportError(
            "--batch-size must be at least 2 (torch.export specialises a batch of 1) and --check-batch-size another "
            f"positive size; got {args.batch_size} and {args.check_batch_size}",
            status=2,
        )
    model = build_model(args)
    size = args.img_size or model_input_size(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(args.batch_size, model.in_chans, size, size, generator=generator)
    images = torch.randn(args.check_batch_size, model.in_chans, size, size, generator=generator)
    with torch.no_grad():
        expected = model(images)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example)
    written = {}
    if "pt2" in args.formats:
        path = args.output.with_name(args.output.name + ".pt2")
        with torch.no_grad():
            error = check("the exported program", program.module()(images), expected, args.atol)
        torch.export.save(program, str(path))
        logger.info("wrote %s (batch %d: max |logits - eager| = %.2e)", path, args.check_batch_size, error)
        written["pt2"] = path
    if "onnx" in args.formats:
        path = args.output.with_name(args.output.name + ".onnx")
        export_onnx(program, path)
        error = check("the ONNX model in onnxruntime", onnx_logits(path, images), expected, args.onnx_atol)
        logger.info("wrote %s (batch %d: max |logits - eager| = %.2e)", path, args.check_batch_size, error)
        written["onnx"] = path
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registered model name, e.g. focal_tiny_patch4_window7_224")
    source.add_argument("--cfg", help="config file (YAML) describing the model, e.g. a run's config.yaml")
    parser.add_argument(
        "--model-args", default="{}", help='JSON constructor overrides for --model: {"num_classes": 10}'
    )
    parser.add_argument("--opts", nargs="+", default=None, help="config overrides for --cfg: KEY VALUE ...")
    parser.add_argument("--checkpoint", type=Path, help="weights to export (ours or released); none: random weights")
    parser.add_argument("--output", type=Path, required=True, help="path prefix: writes PREFIX.pt2 and PREFIX.onnx")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write")
    parser.add_argument("--img-size", type=int, help="input side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch size traced (the dimension stays dynamic)")
    parser.add_argument("--check-batch-size", type=int, default=3, help="batch size the outputs are checked at")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest |logits - eager| allowed for .pt2")
    parser.add_argument("--onnx-atol", type=float, default=1e-3, help="largest |logits - eager| allowed for .onnx")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Command line: bad input or a failed check ends the program with one line on stderr (2 for flags, else 1)."""
    return run_tool("export", export, parse_args(argv))


if __name__ == "__main__":
    main()
