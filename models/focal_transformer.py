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

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .focal_attention import FocalWindowAttention, ring_size
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


class FocalBlock(nn.Module):
    """Focal attention + MLP, pre-norm residual block. x: (B, H, W, C) -> (B, H, W, C).

    The attention is built and called through ``_build_attention`` / ``_attend`` and the configuration
    checked by ``_check_config``: the v2 block (focal_transformer_v2.py) overrides those three and the
    per-window attention FLOPs, and shares the rest.
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
    ) -> None:
        super().__init__()
        self._other_layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see _attend
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
        self.attn = self._build_attention(num_heads, qkv_bias, qk_scale, attn_drop, drop)
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
        """The focal window attention, and the key layout buffers (at the block's resolution) it reads."""
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
        self.register_buffer("key_index", key_index, persistent=False)
        self.register_buffer("key_mask", key_mask, persistent=False)
        return attention

    def _padded(self, H: int, W: int) -> tuple[int, int]:
        ws = self.window_size
        return math.ceil(H / ws) * ws, math.ceil(W / ws) * ws

    def _key_layout(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        Hp, Wp = self._padded(H, W)
        return key_layout(
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
        else:  # another input size: the layout depends only on the padded size, cached per size and device
            cache_key = (*x.shape[1:3], x.device)
            if cache_key not in self._other_layouts:
                layout = self.attn.merge_layout(*self._key_layout(*x.shape[1:3]))
                self._other_layouts[cache_key] = tuple(t.to(x.device) for t in layout)
            key_index, key_mask = self._other_layouts[cache_key]
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
        """Released analytic count (with its approximations: see SEMANTICS.md, 'model.flops() quirks')."""
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


class FocalTransformer(nn.Module):
    """Focal Transformer v1. Keyword arguments are those of the released constructor.

    ``block_fn`` (not a released argument) builds the blocks; FocalTransformerV2 passes its own.
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
        block_fn: Callable[..., FocalBlock] = FocalBlock,
    ) -> None:
        super().__init__()
        if focal_pool not in POOL_METHODS:
            raise ValueError(f"focal_pool must be one of {POOL_METHODS}, got {focal_pool!r}")
        img_h, img_w = to_2tuple(img_size)
        if img_h != img_w:
            raise ValueError(f"img_size must be square (the released model assumes it), got {img_h}x{img_w}")
        img_size = img_h
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.ape = ape
        self.patch_embed = PatchEmbed(
            patch_size, in_chans, embed_dim, use_conv_embed=use_conv_embed, is_stem=True, norm=patch_norm
        )
        sides = stage_resolutions(img_size, patch_size, self.num_layers, use_conv_embed)
        self.patches_resolution = (sides[0], sides[0])
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, sides[0] * sides[0], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
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
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        self.set_grad_checkpointing(use_checkpoint)

    # ---- the timm model interface -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}  # substring of all three table kinds

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> normalised last-stage map (B, h, w, num_features)."""
        x = self.patch_embed(x)  # (B, H, W, D)
        if self.ape:
            if x.shape[1] * x.shape[2] != self.absolute_pos_embed.shape[1]:
                raise ValueError(
                    f"absolute_pos_embed holds {self.absolute_pos_embed.shape[1]} positions but the input gives a "
                    f"{x.shape[1]}x{x.shape[2]} token map: build the model at this img_size (or fine-tune with "
                    "--pretrained, which resizes it)"
                )
            x = x + self.absolute_pos_embed.view(1, x.shape[1], x.shape[2], -1)
        x = self.pos_drop(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
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


__all__ = ["FocalTransformer", "PatchEmbed", "FocalBlock", "FocalStage", "ring_size"]
