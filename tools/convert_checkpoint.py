"""Convert a checkpoint to safetensors: the model's (and its EMA's) state dict, with a JSON sidecar for the rest.

    python tools/convert_checkpoint.py output/focal_demo_patch2_window4_32/default/best.pth
    python tools/convert_checkpoint.py focal-tiny-is.pth --output exported/focal_tiny.safetensors

A safetensors file holds only tensors and loads without unpickling anything, so it is the format to
share weights in. The sidecar (``<name>.json`` next to ``<name>.safetensors``) keeps what else matters
for using the weights: the config (YAML text) and the training position (epoch, step, best accuracy).
A checkpoint trained with MODEL_EMA keeps its EMA weights in the same file under the key prefix
``model_ema.``; ``load_checkpoint_file`` returns them as ``model_ema`` beside ``model``, so
``--eval --opts EVAL_EMA True`` evaluates them (with ``safetensors.torch.load_file`` drop the prefixed keys
to get the model alone).
Optimizer and RNG states are left out: a safetensors file is for evaluation and fine-tuning, not for
resuming. ``main.py --eval --resume`` and ``--pretrained`` read the result (through
``utils.checkpoint.load_checkpoint_file``). The input is loaded safely (weights only) as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.checkpoint_loading import unwrap_state_dict  # noqa: E402
from utils.checkpoint import (  # noqa: E402
    SAFETENSORS_EMA_PREFIX,
    CheckpointError,
    load_checkpoint_file,
    safetensors_sidecar_path,
    write_bytes_atomic,
    write_text_atomic,
)

# Checkpoint entries copied to the sidecar when present (plain numbers and flags).
SIDECAR_KEYS = ("epoch", "step", "epoch_done", "global_step", "max_accuracy", "seed", "world_size", "batch_size")


def model_tensors(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict of ``checkpoint`` as contiguous tensors that share no memory (safetensors needs both)."""
    state_dict = unwrap_state_dict(checkpoint)
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"the model state dict holds entries that are not tensors: {', '.join(not_tensors[:8])}")
    return {key: value.detach().to("cpu").clone().contiguous() for key, value in state_dict.items()}


def ema_tensors(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA state dict of ``checkpoint`` (``{'model_ema': {'model': ...}}``) under the EMA key prefix; {} if none."""
    ema = checkpoint.get("model_ema")
    if ema is None:
        return {}
    if not isinstance(ema, Mapping):
        raise ValueError(f"the checkpoint's model_ema is a {type(ema).__name__}, not a state dict")
    return {SAFETENSORS_EMA_PREFIX + key: value for key, value in model_tensors(ema).items()}


def sidecar(checkpoint: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The JSON-able description of the weights: where they came from, the config and the position."""
    record: dict[str, Any] = {"source": source}
    record.update({key: checkpoint[key] for key in SIDECAR_KEYS if key in checkpoint})
    config = checkpoint.get("config")
    if config is not None:
        record["config"] = config if isinstance(config, str) else config.dump()  # text, or a yacs CfgNode
    return record


def convert(source: Path, output: Path) -> tuple[Path, Path]:
    """Write ``output`` (.safetensors) and its sidecar from checkpoint ``source``; return both paths."""
    if output.suffix != ".safetensors":
        raise ValueError(f"the output must end in .safetensors, got {output}")
    checkpoint = load_checkpoint_file(str(source))
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {source} holds a {type(checkpoint).__name__}, not a dict of tensors")
    tensors = {**model_tensors(checkpoint), **ema_tensors(checkpoint)}
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(str(output), safetensors_bytes(tensors, metadata={"format": "pt"}))
    sidecar_path = Path(safetensors_sidecar_path(str(output)))
    write_text_atomic(str(sidecar_path), json.dumps(sidecar(checkpoint, source.name), indent=2) + "\n")
    return output, sidecar_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a .pth checkpoint (ours or a released one)")
    parser.add_argument("--output", type=Path, help="the .safetensors file (default: next to the checkpoint)")
    args = parser.parse_args(argv)
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        weights, metadata = convert(args.checkpoint, output)
    except (CheckpointError, OSError, ValueError) as error:
        sys.stderr.write(f"convert_checkpoint: error: {error}\n")
        return 1
    sys.stdout.write(f"wrote {weights} and {metadata}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
