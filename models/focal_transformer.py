"""Focal Transformer (v1).

Paper: "Focal Self-attention for Local-Global Interactions in Vision Transformers", Yang et al., NeurIPS 2021
(https://arxiv.org/abs/2107.00641). Original code: https://github.com/microsoft/Focal-Transformer
(classification/focal_transformer.py @57bb303). Parameter names and shapes match the released checkpoints.

Deviations from the released code (none change an output of a configuration the release can run):
- the attention reads its keys through precomputed indices and attends them with batched matrix
  products per image on CPU, two fused Triton kernels on GPU (see focal_attention.py), instead of rolls,
  unfold and piecewise bias additions;
- tokens travel between blocks as (B, H, W, C) maps instead of (B, H*W, C) sequences;
- configurations on which the release crashes (even focal window, expand size > window, shift with a
  resolution that is not a multiple of the window, conv embedding with odd intermediate resolutions,
  unknown ``expand_layer``) raise a ValueError that explains why, at construction;
- derived index and mask buffers are not persistent; ``load_official_weights`` checks released ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, register_notrace_module, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint_loading import load_pretrained_file
from .focal_attention import ATTN_IMPLS, FocalWindowAttention, KeyIndexedAttention, ring_size
from .focal_geometry import PooledLevel, key_layout, pooled_level, shift_attn_mask

POOL_METHODS = ("fc", "conv", "mean", "max", "none")
EXPAND_LAYERS = ("all", "even", "odd")


class PatchEmbed(nn.Module):
    """Patchify (or conv) embedding: (B, C, H, W) -> (B, H', W', D). Used as stem and as downsampling."""

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        use_conv_embed: bool = False,
        is_stem: bool = False,
        norm: bool = True,
        use_pre_norm: bool = False,
    ) -> None:
        super().__init__()
        if use_conv_embed:
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel, stride, padding = patch_size, patch_size, 0
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.pre_norm = nn.GroupNorm(1, in_chans) if use_pre_norm else None
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def output_size(self, size: int) -> int:
        """Output side for an input side ``size``."""
        (k,), (s,), (p,) = self.proj.kernel_size[:1], self.proj.stride[:1], self.proj.padding[:1]
        return (size + 2 * p - k) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', D)
        return x if self.norm is None else self.norm(x)

    def flops(self, out_h: int, out_w: int) -> int:
        """Released analytic count (conv with its real kernel, plus the norm)."""
        kh, kw = self.proj.kernel_size
        flops = out_h * out_w * self.embed_dim * self.in_chans * kh * kw
        if self.norm is not None:
            flops += out_h * out_w * self.embed_dim
        return flops


def make_pool_layer(method: str, dim: int, cell: int) -> nn.Module | None:
    """Learned pooling of one focal level ('fc': one weight per cell position shared by all channels)."""
    if method == "fc":
        return nn.Linear(cell * cell, 1)
    if method == "conv":
        return nn.Conv2d(dim, dim, kernel_size=cell, stride=cell, groups=dim)
    return None


def pool_map(x: torch.Tensor, method: str, layer: nn.Module | None, level: PooledLevel) -> torch.Tensor:
    """Centre-trim a padded map and pool its cells: (B, Hp, Wp, C) -> (B, grid_h, grid_w, C)."""
    B, _, _, C = x.shape
    c, gh, gw = level.cell, level.grid_h, level.grid_w
    x = x[:, level.trim_top : level.trim_top + gh * c, level.trim_left : level.trim_left + gw * c]
    if method == "conv":
        return layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    cells = x.reshape(B, gh, c, gw, c, C)
    if method == "mean":
        return cells.mean((2, 4))
    if method == "max":
        return cells.amax((2, 4))
    cells = cells.permute(0, 1, 3, 5, 2, 4).reshape(B, gh, gw, C, c * c)  # row-major cell positions
    return layer(cells).squeeze(-1)


# ``focal_geometry.key_layout`` (CPU tensors, never modified in place) of the last few geometries asked for: blocks of
# one stage share theirs, and inputs of other sizes than a block's resolution (a detection backbone's) are laid out once
# per size instead of once per call (tens of ms a block at 56x56), in a bounded cache that holds no device memory.
cached_key_layout = functools.lru_cache(maxsize=32)(key_layout)


@register_notrace_module  # reason: pads, shifts and pools by the map's size (Python control flow on shapes)
class FocalBlock(nn.Module):
    """Focal attention + MLP, pre-norm residual block. x: (B, H, W, C) -> (B, H, W, C).

    The attention is built and called through ``_build_attention`` / ``_attend`` and the configuration
    checked by ``_check_config``: the v2 block (focal_transformer_v2.py) overrides those three and the
    per-window attention FLOPs, and shares the rest. What its attention needs beyond v1's arguments comes in
    ``attn_kwargs``, passed on to ``_build_attention`` (nothing is read from attributes set before construction).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        expand_size: int,
        shift_size: int,
        focal_level: int,
        focal_window: int,
        pool_method: str,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        H, W = input_resolution
        if min(H, W) <= window_size:  # one window covers the map (released rule, note the <=)
            window_size, expand_size, shift_size = min(H, W), 0, 0
        self.input_resolution = (H, W)
        self.window_size = window_size
        self.expand_size = expand_size
        self.shift_size = shift_size
        self.focal_level = focal_level
        self.focal_window = focal_window
        self.pool_method = pool_method
        self.mlp_ratio = mlp_ratio
        self.dim = dim
        num_pooled = focal_level - 1 if pool_method != "none" and focal_level > 1 else 0
        self.num_pooled_levels = num_pooled
        if focal_level <= 0:  # no ring without focal levels (released rule), whatever expand_size says
            self.expand_size = 0
        self._check_config()

        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        pool_layers = [make_pool_layer(pool_method, dim, math.floor(window_size / 2**k)) for k in range(num_pooled)]
        self.pool_layers = nn.ModuleList(layer for layer in pool_layers if layer is not None)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = self._build_attention(num_heads, qkv_bias, qk_scale, attn_drop, drop, **(attn_kwargs or {}))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def _check_config(self) -> None:
        """Refuse, with the reason, configurations on which the released v1 block crashes."""
        (H, W), ws = self.input_resolution, self.window_size
        if self.expand_size > ws:
            raise ValueError(f"expand size {self.expand_size} is larger than the window {ws} (res {H}x{W})")
        if self.num_pooled_levels and self.focal_window % 2 == 0:
            raise ValueError(f"focal window must be odd, got {self.focal_window}")
        if self.shift_size and (H % ws or W % ws):
            raise ValueError(
                f"use_shift needs stage resolutions that are multiples of the window: {H}x{W} with window {ws}"
            )

    def _build_attention(
        self, num_heads: int, qkv_bias: bool, qk_scale: float | None, attn_drop: float, proj_drop: float
    ) -> nn.Module:
        """The focal window attention, and the key layout buffers (at the block's resolution) it reads.

        Built on the CPU, then moved to the device the model is built on: the index buffers come from the geometry
        through data-dependent operations (``nonzero``, indexing) that a model built on the meta device (as timm's
        factory tests build it) could not run.
        """
        device = torch.get_default_device()
        with torch.device("cpu"):
            attention = FocalWindowAttention(
                self.dim,
                num_heads,
                self.window_size,
                self.expand_size,
                self.focal_window,
                self.num_pooled_levels,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
            key_index, key_mask = attention.merge_layout(*self._key_layout(*self.input_resolution))
        self.register_buffer("key_index", key_index.to(device), persistent=False)
        self.register_buffer("key_mask", key_mask.to(device), persistent=False)
        return attention.to(device)

    def _padded(self, H: int, W: int) -> tuple[int, int]:
        ws = self.window_size
        return math.ceil(H / ws) * ws, math.ceil(W / ws) * ws

    def _key_layout(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key layout (released key order) of an (H, W) input, on the CPU, from ``cached_key_layout``."""
        Hp, Wp = self._padded(H, W)
        with torch.device("cpu"):  # the geometry's data-dependent operations, whatever the default device
            return cached_key_layout(
                Hp, Wp, self.window_size, self.expand_size, self.focal_window, self.num_pooled_levels, self.shift_size
            )

    def released_buffers(self) -> dict[str, torch.Tensor]:
        """Derived buffers of the released block (its shift mask), by name."""
        if not self.shift_size:
            return {}
        return {"attn_mask": shift_attn_mask(*self.input_resolution, self.window_size, self.shift_size)}

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        """norm1'd map (B, H, W, C) -> attention output (B, H, W, C): pad, shift, pool, attend, undo."""
        _, H, W, _ = x.shape
        Hp, Wp = self._padded(H, W)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # zeros right/bottom, never masked
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        pooled = [
            pool_map(x, self.pool_method, self.pool_layers[k] if self.pool_layers else None, level)
            for k, level in enumerate(pooled_level(Hp, Wp, self.window_size, k) for k in range(self.num_pooled_levels))
        ]
        x = self._attend(x, pooled)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x[:, :H, :W]

    def _attend(self, x: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        """Attention of the padded, shifted map (B, Hp, Wp, C) given its pooled maps; same shape out."""
        if x.shape[1:3] == self._padded(*self.input_resolution):
            key_index, key_mask = self.key_index, self.key_mask
        else:  # another input size: its layout from the CPU cache, moved to the input's device
            key_index, key_mask = self.attn.merge_layout(*(t.to(x.device) for t in self._key_layout(*x.shape[1:3])))
        return self.attn(x, pooled, key_index, key_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(_scaled(self._attention(self.norm1(x)), self.gamma_1))
        return x + self.drop_path(_scaled(self.mlp(self.norm2(x)), self.gamma_2))

    def _attention_flops_per_window(self) -> int:
        """Released count of one window's attention: qkv, q k^T and attn v over window, ring and pooled keys, proj."""
        ws, dim, nH = self.window_size, self.dim, self.attn.num_heads
        n = ws * ws
        per_window = n * dim * 3 * dim + 2 * nH * n * (dim // nH) * n + n * dim * dim
        if self.num_pooled_levels:
            per_window += 2 * nH * n * (dim // nH) * self.focal_window**2
        if self.expand_size:
            per_window += 2 * nH * n * (dim // nH) * ((ws + 2 * self.expand_size) ** 2 - ws**2)
        return per_window

    def flops(self) -> float:
        """Released analytic count (with its approximations: see docs/released_semantics.md, 'model.flops() quirks')."""
        H, W = self.input_resolution
        ws, dim = self.window_size, self.dim
        n_windows, per_window = H * W / ws / ws, self._attention_flops_per_window()
        flops = 2 * dim * H * W + n_windows * per_window + 2 * H * W * dim * dim * self.mlp_ratio
        for k in range(self.num_pooled_levels):
            cell = math.floor(ws / 2**k)
            flops += n_windows * 2**k * (dim * cell * cell + dim * 3 * dim)
        return flops


def _scaled(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else gamma * x


def expand_sizes_of_blocks(depth: int, expand_size: int, expand_layer: str) -> list[int]:
    """Ring width of each block of a stage.

    Released naming: 'even' expands only odd-index blocks, 'odd' only even-index ones.
    """
    if expand_layer not in EXPAND_LAYERS:
        raise ValueError(f"expand_layer must be one of {EXPAND_LAYERS}, got {expand_layer!r}")
    skipped_parity = {"all": None, "even": 0, "odd": 1}[expand_layer]
    return [0 if i % 2 == skipped_parity else expand_size for i in range(depth)]


class FocalStage(nn.Module):
    """Blocks of one resolution, then an optional PatchEmbed downsampling. (B, H, W, C) -> (B, H', W', C')."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        expand_size: int,
        expand_layer: str,
        use_shift: bool,
        drop_path: list[float],
        downsample: bool,
        use_conv_embed: bool = False,
        use_pre_norm: bool = False,
        block_fn: Callable[..., FocalBlock] = FocalBlock,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.grad_checkpointing = False
        expand = expand_sizes_of_blocks(depth, expand_size, expand_layer)
        self.blocks = nn.ModuleList(
            block_fn(
                dim,
                input_resolution,
                num_heads,
                window_size,
                expand_size=expand[i],
                shift_size=window_size // 2 if use_shift and i % 2 else 0,
                drop_path=drop_path[i],
                **block_kwargs,
            )
            for i in range(depth)
        )
        self.downsample = (
            PatchEmbed(2, dim, 2 * dim, use_conv_embed=use_conv_embed, use_pre_norm=use_pre_norm)
            if downsample
            else None
        )

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks without the downsampling (honouring gradient checkpointing): (B, H, W, C) -> same."""
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        return x

    def flops(self) -> float:
        flops = sum(block.flops() for block in self.blocks)
        if self.downsample is not None:
            H, W = self.input_resolution
            flops += self.downsample.flops(H // 2, W // 2)
        return flops


def stage_resolutions(img_size: int, patch_size: int, num_stages: int, use_conv_embed: bool) -> list[int]:
    """Side of the token map of each stage, as the released model assumes (img // patch // 2^i).

    With conv embeddings the strided convolutions round up, so an odd intermediate side would not match
    (the release crashes there); that is refused here with the offending side named.
    """
    sides = [img_size // patch_size // 2**i for i in range(num_stages)]
    if use_conv_embed:
        stem = PatchEmbed(patch_size, 3, 1, use_conv_embed=True, is_stem=True).output_size(img_size)
        produced = [stem] + [math.ceil(s / 2) for s in sides[:-1]]
        bad = [i for i, (want, got) in enumerate(zip(sides, produced)) if want != got]
        if bad:
            raise ValueError(
                f"use_conv_embed with img_size {img_size} gives stage {bad[0]} a {produced[bad[0]]}x"
                f"{produced[bad[0]]} map where {sides[bad[0]]}x{sides[bad[0]]} is expected "
                "(intermediate resolutions must be even)"
            )
    return sides


GLOBAL_POOLS = ("avg", "")  # the head's pooling: mean over the token map, or none (timm's names)


def resize_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, N, C) square absolute position embedding -> (1, height, width, C), bicubic when the size differs.

    Kept instead of timm's ``resample_abs_pos_embed``: it computes in float32 (the fp64 checks need fp64) and
    antialiases by default."""
    side = math.isqrt(pos_embed.shape[1])
    grid = pos_embed.view(1, side, side, -1)
    if (side, side) == (height, width):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


@register_notrace_function  # reason: compares the token map's size with the embedding's (control flow on shapes)
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor, resize: bool) -> torch.Tensor:
    """Token map (B, h, w, C) plus the absolute position embedding (1, N, C).

    As stored when N = h * w; with ``resize`` the embedding is resized bicubically to (h, w) instead (the model's
    ``dynamic_img_size``); otherwise another size is a ValueError.
    """
    _, h, w, _ = x.shape
    if resize:
        return x + resize_pos_embed(pos_embed, h, w)
    if h * w != pos_embed.shape[1]:
        raise ValueError(
            f"absolute_pos_embed holds {pos_embed.shape[1]} positions but the input gives a {h}x{w} token map: "
            "build the model at this img_size (or fine-tune with --pretrained, which resizes it), or set "
            "dynamic_img_size=True"
        )
    return x + pos_embed.view(1, h, w, -1)


class FocalTrunk(nn.Module):
    """The stem and stages of a Focal Transformer run for their features: what the classifier (``FocalTransformer``)
    and the detection backbone (``backbone.FocalBackbone``) share.

    Subclasses hold ``patch_embed``, ``ape`` (and ``absolute_pos_embed``), ``dynamic_img_size``, ``pos_drop`` and
    ``layers`` (``FocalStage``s); ``norm`` (the final norm) is read only for ``norm=True`` or the final features.
    """

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> token map (B, h, w, D): stem, absolute position embedding, dropout."""
        x = self.patch_embed(x)  # (B, h, w, D)
        if self.ape:
            x = add_pos_embed(x, self.absolute_pos_embed, self.dynamic_img_size)
        return self.pos_drop(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The output of each stage's blocks (before its downsampling), and the final features.

        Args:
            x: images (B, C, H, W); any size for v1 (each block pads to its windows).
            indices: stages to return: the last n if an int, all if None, those listed otherwise (negative from the
                end).
            norm: apply the final norm to the last stage's output (the only one it is sized for).
            stop_early: run no stage after the last one asked for (the final features are then that stage's
                output, without the final norm).
            output_fmt: "NCHW" (B, C_i, h_i, w_i) or "NHWC" (B, h_i, w_i, C_i).
            intermediates_only: return only the list of stage outputs.

        Returns:
            The stage outputs, or (final features (B, h, w, C) as ``forward_features`` gives them, stage outputs).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: max_index + 1] if stop_early else self.layers
        intermediates = []
        x = self._embed(x)
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)  # (B, h_i, w_i, C_i)
            if i in take_indices:
                out = self.norm(x) if norm and i == len(self.layers) - 1 else x
                intermediates.append(out if output_fmt == "NHWC" else out.permute(0, 3, 1, 2).contiguous())
            if i < len(stages) - 1:
                x = stage.downsample(x.permute(0, 3, 1, 2))  # (B, h_i / 2, w_i / 2, 2 C_i)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.layers):
            x = self.norm(x)
        return x, intermediates


class FocalTransformer(FocalTrunk):
    """Focal Transformer v1. Keyword arguments are those of the released constructor, then (keyword-only, not
    released) those of timm's model interface:

    - ``global_pool``: "avg" (released) or "" (``forward`` returns the normalised (B, h, w, C) map);
    - ``dynamic_img_size``: resize the absolute position embedding (``ape``) to the input's token map instead of
      refusing another input size;
    - ``attn_impl``: the attention implementation, see ``set_attn_impl``;
    - ``block_fn``: builds the blocks; FocalTransformerV2 passes its own.

    Token maps travel as (B, H, W, C) (``output_fmt`` "NHWC"); ``forward_intermediates`` gives the stage outputs
    (before each stage's downsampling), ``feature_info`` their channels and strides.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        use_shift: bool = False,
        focal_stages: tuple[int, ...] = (0, 1, 2, 3),
        focal_levels: tuple[int, ...] = (1, 1, 1, 1),
        focal_windows: tuple[int, ...] = (7, 5, 3, 1),
        focal_pool: str = "fc",
        expand_stages: tuple[int, ...] = (0, 1, 2, 3),  # accepted, unused (as released)
        expand_sizes: tuple[int, ...] = (4, 4, 4, 4),
        expand_layer: str = "all",
        use_conv_embed: bool = False,
        use_layerscale: bool = False,
        layerscale_value: float = 1e-4,
        use_pre_norm: bool = False,
        *,
        global_pool: str = "avg",
        dynamic_img_size: bool = False,
        attn_impl: str = "auto",
        block_fn: Callable[..., FocalBlock] = FocalBlock,
    ) -> None:
        super().__init__()
        if focal_pool not in POOL_METHODS:
            raise ValueError(f"focal_pool must be one of {POOL_METHODS}, got {focal_pool!r}")
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        img_h, img_w = to_2tuple(img_size)
        if img_h != img_w:
            raise ValueError(f"img_size must be square (the released model assumes it), got {img_h}x{img_w}")
        img_size = img_h
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.output_fmt = "NHWC"
        self.ape = ape
        self.dynamic_img_size = dynamic_img_size
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, embed_dim, use_conv_embed=use_conv_embed, is_stem=True, norm=patch_norm
        )
        sides = stage_resolutions(img_size, patch_size, self.num_layers, use_conv_embed)
        self.patches_resolution = (sides[0], sides[0])
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, sides[0] * sides[0], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                FocalStage(
                    dim=embed_dim * 2**i,
                    input_resolution=(sides[i], sides[i]),
                    depth=depth,
                    num_heads=num_heads[i],
                    window_size=window_size,
                    expand_size=expand_sizes[i],
                    expand_layer=expand_layer,
                    use_shift=use_shift,
                    drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < self.num_layers - 1,
                    use_conv_embed=use_conv_embed,
                    use_pre_norm=use_pre_norm,
                    block_fn=block_fn,
                    focal_level=focal_levels[i],
                    focal_window=focal_windows[i],
                    pool_method=focal_pool if i in focal_stages else "none",
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    use_layerscale=use_layerscale,
                    layerscale_value=layerscale_value,
                )
            )
        stem_stride = self.patch_embed.proj.stride[0]
        self.feature_info = [
            dict(num_chs=embed_dim * 2**i, reduction=stem_stride * 2**i, module=f"layers.{i}.blocks.{depth - 1}")
            for i, depth in enumerate(depths)
        ]
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.set_grad_checkpointing(use_checkpoint)
        self.set_attn_impl(attn_impl)

    # ---- the timm model interface -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}  # substring of all three table kinds

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order (timm's layer-wise learning-rate decay): the stem, then each block (each
        stage unless ``coarse``); a stage's downsampling and the final norm join the group of the block before them
        (timm's 99999 suffix); the head, unmatched, comes last."""
        return dict(
            stem=r"^patch_embed|^absolute_pos_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99999,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_attn_impl(self, attn_impl: str) -> None:
        """Choose the attention implementation of every block (``focal_attention.attention_path``).

        "auto" (default): the fused Triton kernels on CUDA, the chunked CPU path on CPU, the reference with attention
        dropout or what the kernels do not take; "reference": gathered keys and one ``scaled_dot_product_attention``
        everywhere; "fused" / "chunked": that implementation or an error saying why it cannot run. Every choice
        takes the reference while ``torch.export`` traces.
        """
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        for module in self.modules():
            if isinstance(module, KeyIndexedAttention):
                module.attn_impl = attn_impl

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """Load a checkpoint file, ours or released (timm calls this for a pretrained cfg with ``custom_load``; see
        ``checkpoint_loading.load_pretrained_file``)."""
        load_pretrained_file(self, checkpoint_path)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, ``forward`` gives the pooled features), on the model's device and
        dtype; ``global_pool`` ("avg" or "") changes the pooling, None keeps it."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            like = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.parameters())
            self.head = nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
            _init_weights(self.head)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove what ``forward_intermediates(indices)`` does not need: the stages after the last index (and the
        downsampling of that stage), the final norm (if ``prune_norm`` or stages were removed) and the head (if
        ``prune_head`` or stages were removed; the pooling goes with it). Returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_end:
            self.layers = self.layers[: max_index + 1]
            self.layers[-1].downsample = None  # the features end at the tap
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> normalised last-stage map (B, h, w, num_features)."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features (B, h, w, C) -> pooled (B, C) (with ``global_pool`` "avg") -> logits, unless ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean((1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def flops(self) -> float:
        """The released analytic FLOP count (multiply-adds), the figure the paper reports."""
        h, w = self.patches_resolution
        flops = self.patch_embed.flops(h, w)
        flops += sum(stage.flops() for stage in self.layers)
        flops += self.num_features * h * w // 2**self.num_layers  # released (Swin) final-norm term
        return flops + self.num_features * self.num_classes


def _init_weights(module: nn.Module) -> None:
    """Released init: trunc-normal Linear weights (fc pooling included), unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


__all__ = ["FocalTransformer", "FocalTrunk", "PatchEmbed", "FocalBlock", "FocalStage", "add_pos_embed", "ring_size"]
