"""Draw where one query looks: the focal attention weights of a query token, per stage, over the image.

One block per stage (the last by default) is observed while the model runs on the image. From that
block's attention inputs the softmax weights of the query's token are recomputed (the mean over heads
is drawn) and every key slot is mapped back to image regions with the geometry of
``models/focal_geometry.py``: key indices below Hp*Wp are fine tokens (the query's window and its ring)
of the padded, shifted map; the following ranges are the cells of each pooled map; the last index is
the zero slot that stands for the pooled maps' zero padding (masked, weight ~0). One PNG per stage: the
image with the query and its window, the fine tokens coloured by weight, and each pooled level's cells
coloured by weight.

    python tools/visualize_attention.py --model focal_tiny_patch4_window7_224 --checkpoint ckpt.pth \\
        --image cat.jpg --query 100 120 --out attention/
    python tools/visualize_attention.py --cfg configs/demo.yaml --query 12 20 --out attention/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.focal_attention import FocalWindowAttention  # noqa: E402
from models.focal_geometry import PooledLevel, pooled_level  # noqa: E402
from models.focal_transformer import FocalBlock, FocalTransformer  # noqa: E402
from tools.model_flags import model_from_flags  # noqa: E402
from utils.errors import ToolError, run_tool  # noqa: E402

logger = logging.getLogger("visualize_attention")


# ---- images -------------------------------------------------------------------------------------------
def generated_image(size: int, seed: int = 0) -> torch.Tensor:
    """A synthetic (3, size, size) image in [0, 1]: a colour gradient with a few bright discs and boxes."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    image = torch.stack(torch.broadcast_tensors(ramp[:, None], ramp[None, :], 0.5 * ramp.flip(0)[:, None])).clone()
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(3):
        r, c = (torch.rand(2, generator=generator) * size).tolist()
        radius = size * (0.08 + 0.1 * torch.rand(1, generator=generator).item())
        image[:, (rows - r) ** 2 + (cols - c) ** 2 < radius**2] = torch.rand(3, 1, generator=generator)
        top, left = (torch.rand(2, generator=generator) * size * 0.8).long().tolist()
        image[:, top : top + size // 6, left : left + size // 5] = torch.rand(3, 1, 1, generator=generator)
    return image


def load_image(path: Path, size: int) -> torch.Tensor:
    """An RGB image file resized to (3, size, size), values in [0, 1]."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        data = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return data.permute(2, 0, 1).contiguous()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> ImageNet-normalised (1, 3, H, W)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return ((image - mean) / std)[None]


# ---- capturing a block's attention inputs -------------------------------------------------------------
@dataclass
class BlockCapture:
    """What one block's attention saw: the unpadded map size and the arguments of ``attn.forward``."""

    map_size: tuple[int, int]
    x: torch.Tensor  # (1, Hp, Wp, C) normed, padded, shifted map
    pooled: list[torch.Tensor]  # (1, gh_k, gw_k, C) per pooled level
    key_index: torch.Tensor  # (nW, N), repeated ring keys merged (``FocalWindowAttention.merge_layout``)
    key_mask: torch.Tensor  # (nW, ws^2, N)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, images: torch.Tensor, blocks: Sequence[FocalBlock]) -> list[BlockCapture]:
    """Run ``model`` on ``images`` (batch of 1) and return the attention inputs of each of ``blocks``."""
    sizes, inputs, handles = {}, {}, []

    def block_hook(index):
        def hook(_module, args):
            sizes[index] = tuple(args[0].shape[1:3])

        return hook

    def attn_hook(index):
        def hook(_module, args):
            inputs[index] = args

        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_hook(index)))
            handles.append(block.attn.register_forward_pre_hook(attn_hook(index)))
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [BlockCapture(sizes[i], *inputs[i]) for i in range(len(blocks))]


# ---- the query's attention ----------------------------------------------------------------------------
def gather_keys_values(
    attn: FocalWindowAttention, x: torch.Tensor, pooled: Sequence[torch.Tensor], key_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one window's key slots ``key_index`` (N,): each (nH, N, head_dim)."""
    C, nH = attn.dim, attn.num_heads
    kv_weight, kv_bias = attn.qkv.weight[C:], None if attn.qkv.bias is None else attn.qkv.bias[C:]
    sources = [F.linear(m[0].reshape(-1, C), kv_weight, kv_bias) for m in (x, *pooled)]
    sources.append(x.new_zeros(1, 2 * C))  # the zero slot
    kv = torch.cat(sources)[key_index]  # (N, 2C)
    k, v = kv.view(len(key_index), 2, nH, C // nH).permute(1, 2, 0, 3)  # (nH, N, hd) each
    return k, v


def query_slot(token: tuple[int, int], shift: int, padded: tuple[int, int], window_size: int) -> tuple[int, int]:
    """(window index, position in the window) of the map token ``token`` in the padded, shifted map."""
    Hp, Wp = padded
    r, c = (token[0] - shift) % Hp, (token[1] - shift) % Wp
    ws = window_size
    return (r // ws) * (Wp // ws) + c // ws, (r % ws) * ws + c % ws


@torch.no_grad()
def query_weights(attn: FocalWindowAttention, capture: BlockCapture, window: int, position: int) -> torch.Tensor:
    """Softmax attention weights (nH, N) of query ``position`` of ``window`` over the window's key slots."""
    x, C, nH = capture.x, attn.dim, attn.num_heads
    ws = attn.window_size
    Wp = x.shape[2]
    row = (window // (Wp // ws)) * ws + position // ws
    col = (window % (Wp // ws)) * ws + position % ws
    q_bias = None if attn.qkv.bias is None else attn.qkv.bias[:C]
    q = F.linear(x[0, row, col], attn.qkv.weight[:C], q_bias).view(nH, C // nH)  # (nH, hd)
    k, _ = gather_keys_values(attn, x, capture.pooled, capture.key_index[window])
    logits = torch.einsum("hd,hnd->hn", q * attn.scale, k)
    logits = logits + attn.merged_position_bias()[:, position] + capture.key_mask[window, position]
    return logits.softmax(-1)


@dataclass
class QueryAttention:
    """The attention of one query token in one block, with the geometry to place its keys."""

    stage: int
    block: int
    stride: int  # image pixels per token side at this stage
    map_size: tuple[int, int]
    padded_size: tuple[int, int]
    window_size: int
    shift_size: int
    token: tuple[int, int]  # the query's token in the (unshifted) map
    window: int
    position: int
    weights: torch.Tensor  # (nH, N), each row sums to 1
    key_index: torch.Tensor  # (N,) into the key source
    levels: list[PooledLevel]


def query_attention(
    block: FocalBlock, capture: BlockCapture, pixel: tuple[int, int], stride: int, stage: int, block_index: int
) -> QueryAttention:
    """The attention of the token under image ``pixel`` (row, col) in ``block``."""
    H, W = capture.map_size
    Hp, Wp = capture.x.shape[1:3]
    ws = block.window_size
    token = (min(pixel[0] // stride, H - 1), min(pixel[1] // stride, W - 1))
    window, position = query_slot(token, block.shift_size, (Hp, Wp), ws)
    return QueryAttention(
        stage=stage,
        block=block_index,
        stride=stride,
        map_size=(H, W),
        padded_size=(Hp, Wp),
        window_size=ws,
        shift_size=block.shift_size,
        token=token,
        window=window,
        position=position,
        weights=query_weights(block.attn, capture, window, position),
        key_index=capture.key_index[window],
        levels=[pooled_level(Hp, Wp, ws, k) for k in range(block.num_pooled_levels)],
    )


@dataclass
class KeyWeights:
    """Head-averaged weights of a query placed on the (unshifted) padded token map (Hp, Wp)."""

    fine: torch.Tensor  # weight of each token (repeated ring keys summed)
    pooled: list[torch.Tensor]  # per pooled level: each token carries the weight of the cell holding it
    fine_total: float
    pooled_totals: list[float]
    zero_slot: float  # weight of the masked zero slot (pooled neighbours outside the pooled map)


def key_weights(qa: QueryAttention) -> KeyWeights:
    """Map every key slot of the query back to the tokens it stands for."""
    Hp, Wp = qa.padded_size
    weights, index = qa.weights.mean(0), qa.key_index
    shift = (qa.shift_size, qa.shift_size)
    is_fine = index < Hp * Wp
    fine = torch.zeros(Hp * Wp).index_add_(0, index[is_fine], weights[is_fine]).view(Hp, Wp)
    pooled, totals, offset = [], [], Hp * Wp
    for level in qa.levels:
        cells = level.grid_h * level.grid_w
        in_level = (index >= offset) & (index < offset + cells)
        grid = torch.zeros(cells).index_add_(0, index[in_level] - offset, weights[in_level])
        grid = grid.view(level.grid_h, level.grid_w).repeat_interleave(level.cell, 0).repeat_interleave(level.cell, 1)
        token_map = torch.zeros(Hp, Wp)  # zero outside the centre-trimmed pooled area
        top, left = level.trim_top, level.trim_left
        token_map[top : top + grid.shape[0], left : left + grid.shape[1]] = grid
        pooled.append(torch.roll(token_map, shifts=shift, dims=(0, 1)))
        totals.append(float(weights[in_level].sum()))
        offset += cells
    return KeyWeights(
        fine=torch.roll(fine, shifts=shift, dims=(0, 1)),
        pooled=pooled,
        fine_total=float(weights[is_fine].sum()),
        pooled_totals=totals,
        zero_slot=float(weights[index == offset].sum()),
    )


def wrapped_spans(start: int, length: int, period: int) -> list[tuple[int, int]]:
    """[start, start + length) modulo ``period`` as at most two plain (begin, end) spans."""
    start %= period
    if start + length <= period:
        return [(start, start + length)]
    return [(start, period), (0, start + length - period)]


def window_rectangles(qa: QueryAttention) -> list[tuple[int, int, int, int]]:
    """The query's window as (top, left, height, width) token rectangles of the unshifted map."""
    Hp, Wp = qa.padded_size
    ws, n_cols = qa.window_size, qa.padded_size[1] // qa.window_size
    top = (qa.window // n_cols) * ws + qa.shift_size
    left = (qa.window % n_cols) * ws + qa.shift_size
    return [
        (r0, c0, r1 - r0, c1 - c0) for r0, r1 in wrapped_spans(top, ws, Hp) for c0, c1 in wrapped_spans(left, ws, Wp)
    ]


# ---- drawing ------------------------------------------------------------------------------------------
def _draw_window_and_query(ax, qa: QueryAttention, pixel: tuple[int, int]) -> None:
    s = qa.stride
    for top, left, height, width in window_rectangles(qa):
        ax.add_patch(Rectangle((left * s, top * s), width * s, height * s, fill=False, edgecolor="red", linewidth=1.5))
    ax.plot(pixel[1], pixel[0], marker="*", color="red", markersize=10, markeredgecolor="white")


def draw_stage(
    image: torch.Tensor, qa: QueryAttention, pixel: tuple[int, int], out_path: Path, title: str = ""
) -> Path:
    """Write the figure of one stage: image + window, fine-token weights, then each pooled level's weights."""
    kw = key_weights(qa)
    panels = [("window + ring", kw.fine, kw.fine_total)] + [
        (f"pooled level {k}, cells of {lvl.cell}x{lvl.cell}", m, total)
        for k, (lvl, m, total) in enumerate(zip(qa.levels, kw.pooled, kw.pooled_totals))
    ]
    figure = Figure(figsize=(4.2 * (len(panels) + 1), 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels) + 1, squeeze=False)[0]
    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()  # (H, W, 3)
    Hp, Wp = qa.padded_size
    extent = (0, Wp * qa.stride, Hp * qa.stride, 0)
    for ax in axes:
        ax.imshow(picture, extent=(0, picture.shape[1], picture.shape[0], 0))
        ax.set_xlim(0, max(picture.shape[1], extent[1]))
        ax.set_ylim(max(picture.shape[0], extent[2]), 0)
        ax.set_xticks([])
        ax.set_yticks([])
        _draw_window_and_query(ax, qa, pixel)
    axes[0].set_title(f"query token {qa.token}, its {qa.window_size}x{qa.window_size} window", fontsize=9)
    for ax, (name, weights, total) in zip(axes[1:], panels):
        shown = ax.imshow(np.ma.masked_equal(weights.numpy(), 0), extent=extent, cmap="viridis", alpha=0.8, vmin=0)
        figure.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(f"{name}: weight {total:.3f}", fontsize=9)
    figure.suptitle(title or f"stage {qa.stage}, block {qa.block} (masked zero slot {kw.zero_slot:.1e})", fontsize=10)
    figure.savefig(out_path, dpi=100)
    return out_path


# ---- the whole pipeline -------------------------------------------------------------------------------
def stage_stride(model: FocalTransformer, stage: int) -> int:
    """Image pixels per token side at ``stage``."""
    return model.patch_embed.proj.stride[0] * 2**stage


def model_image_size(model: FocalTransformer) -> int:
    """The square input size the model was built for."""
    return model.patches_resolution[0] * model.patch_embed.proj.stride[0]


def visualize_attention(
    model: FocalTransformer,
    image: torch.Tensor,
    pixel: tuple[int, int],
    out_dir: Path,
    block_index: int = -1,
) -> list[QueryAttention]:
    """Write ``stage{i}.png`` per stage for the query at image ``pixel`` (row, col); return the attentions.

    ``image`` is (3, H, W) in [0, 1]; ``block_index`` picks the observed block of every stage.
    """
    blocks = [stage.blocks[block_index] for stage in model.layers]
    if not all(isinstance(block.attn, FocalWindowAttention) for block in blocks):
        raise TypeError(f"only v1 focal attention can be drawn, {type(model).__name__} has another kind")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    captures = capture_block_inputs(model, normalize(image), blocks)
    results = []
    for stage, (block, capture) in enumerate(zip(blocks, captures)):
        index = block_index % len(model.layers[stage].blocks)
        qa = query_attention(block, capture, pixel, stage_stride(model, stage), stage, index)
        path = draw_stage(image, qa, pixel, out_dir / f"stage{stage}.png")
        logger.info("wrote %s", path)
        results.append(qa)
    return results


# ---- command line -------------------------------------------------------------------------------------
class InputError(ToolError):
    """Bad input (a path, a name, a checkpoint that does not fit): reported in one line with ``status``."""


def _checkpoints_below(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder`` (a run folder) or in the run folders below it (a run root)."""
    for depth in ("", "*/", "*/*/"):
        found = sorted(path for suffix in (".pth", ".safetensors") for path in folder.glob(f"{depth}*{suffix}"))
        if found:
            return found
    return []


def check_paths(args: argparse.Namespace) -> None:
    """Fail fast, before building a model, on paths that cannot be what the flags ask for."""
    if args.cfg and Path(args.cfg).is_dir():
        config = Path(args.cfg) / "config.yaml"
        hint = f": pass its config file, {config}" if config.is_file() else ""
        raise InputError(f"--cfg {args.cfg} is a folder, not a config file{hint}", status=2)
    if args.checkpoint and args.checkpoint.is_dir():
        found = _checkpoints_below(args.checkpoint)
        best = [path for path in found if path.name == "best.pth"] or found
        hint = f" (it holds {len(found)}, e.g. {best[0]})" if found else " (none was found in it)"
        raise InputError(f"--checkpoint {args.checkpoint} is a folder: pass a checkpoint file{hint}", status=2)
    for flag, path in (("--checkpoint", args.checkpoint), ("--image", args.image)):
        if path and not path.exists():
            raise InputError(f"{flag} {path} does not exist")


def _shortened(error: Exception, limit: int = 4) -> str:
    """A mismatch message without its long list of keys: the first ``limit`` problems and how many in all."""
    head, _, problems = str(error).partition(": ")
    parts = problems.split("; ")
    if len(parts) <= limit:
        return str(error)
    return f"{head}: {'; '.join(parts[:limit])}; ... ({len(parts)} mismatched entries in all)"


def build_model(args: argparse.Namespace) -> FocalTransformer:
    """The model named by ``--model`` / ``--model-args`` or ``--cfg`` / ``--opts``, with ``--checkpoint`` loaded."""
    model = model_from_flags(args)
    v1_blocks = isinstance(model, FocalTransformer) and all(
        isinstance(block.attn, FocalWindowAttention) for stage in model.layers for block in stage.blocks
    )
    if not v1_blocks:
        raise InputError(f"visualize_attention needs a Focal Transformer (v1), got {type(model).__name__}", status=2)
    if args.checkpoint:
        from models.checkpoint_loading import CheckpointMismatchError
        from models.finetune import load_pretrained
        from utils.checkpoint import CheckpointError, load_checkpoint_file

        try:
            load_pretrained(model, load_checkpoint_file(str(args.checkpoint)), logger)
        except CheckpointMismatchError as error:
            raise InputError(f"checkpoint {args.checkpoint} is not of this model: {_shortened(error)}") from None
        except CheckpointError as error:
            raise InputError(str(error)) from None
    return model


def read_image(path: Path, size: int) -> torch.Tensor:
    """``load_image``, with a file that is not a readable image reported as bad input."""
    from PIL import UnidentifiedImageError

    try:
        return load_image(path, size)
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read image {path}: {error}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registered model name, e.g. focal_tiny_patch4_window7_224")
    source.add_argument("--cfg", help="config file (YAML) describing the model")
    parser.add_argument("--model-args", default="{}", help='JSON constructor overrides for --model: {"img_size": 64}')
    parser.add_argument("--opts", nargs="+", default=None, help="config overrides for --cfg: KEY VALUE ...")
    parser.add_argument("--checkpoint", type=Path, help="weights to load (adapted to the model's size if needed)")
    parser.add_argument("--image", type=Path, help="image file; a generated image when omitted")
    parser.add_argument("--size", type=int, help="input side in pixels (default: the model's img_size)")
    parser.add_argument("--query", type=int, nargs=2, required=True, metavar=("ROW", "COL"), help="query pixel")
    parser.add_argument("--block", type=int, default=-1, help="which block of every stage to show (default: last)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated image")
    parser.add_argument("--out", type=Path, default=Path("attention"), help="folder for the PNG files")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[QueryAttention]:
    """The drawing the flags ask for; ``InputError`` for bad input."""
    check_paths(args)
    model = build_model(args)
    size = args.size or model_image_size(model)
    image = read_image(args.image, size) if args.image else generated_image(size, args.seed)
    row, col = args.query
    if not (0 <= row < size and 0 <= col < size):
        raise InputError(f"query pixel ({row}, {col}) is outside the {size}x{size} image", status=2)
    return visualize_attention(model, image, (row, col), args.out, block_index=args.block)


def main(argv: Sequence[str] | None = None) -> list[QueryAttention]:
    """Command line: bad input ends the program with one line on stderr (exit status 2 for flags, else 1)."""
    return run_tool("visualize_attention", run, parse_args(argv))


if __name__ == "__main__":
    main()
