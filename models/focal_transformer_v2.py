"""Focal Transformer v2 ("focal-fast").

Same paper as v1 (https://arxiv.org/abs/2107.00641); released as classification/focal_transformer_v2.py in
https://github.com/microsoft/Focal-Transformer (@57bb303). Parameter and buffer names and shapes match the
released "fast" checkpoints. Only what differs from v1 lives here: the top-K attention and its block. Embedding,
blocks, stages, head and checkpoint loading are those of focal_transformer.py.

Each window attends, for every focal level l, to a fixed set of keys: level 0 the K tokens of the full-resolution
map nearest to the window centre, level l >= 1 the K windows nearest to it on the window grid, read from pooled
map l. A per-level MLP (``coord2rpb_all.{l}``) turns every query-key displacement into a per-head bias. There is
no padding, no ring and no mask. Exact behaviour: docs/released_semantics.md, from "Focal-fast: what it shares with v1"
to "Focal-fast valid configurations", the "focal-fast level >= 2 quirk" included.

Deviations from the released code (none change an output of a configuration the release can run):
- the keys of all levels are read through one index by v1's attention (``KeyIndexedAttention``: the
  fused Triton kernels on CUDA, image by image on CPU);
- configurations on which the release crashes raise a ValueError at construction: focal level 0, a focal level
  above 1 without a pooled map, a stage resolution above the window that is not a multiple of it (there is no
  padding), and v1's rules; ``focal_topK`` < 1 is refused too;
- the Swin shift mask of shifted blocks, which v2 builds but never applies, is not a buffer;
  ``load_official_weights`` checks a released one;
- a map of another size than the block's resolution is refused in forward (the release asserts the same).

The top-K index buffers (``topk_cloest_indice_{l}``, released spelling) are persistent: the release picks the keys
with ``torch.topk``, whose choice among equidistant keys is implementation-defined and decides which keys exist,
so a released checkpoint's indices are loaded, never recomputed. On load they are checked (index range, K nearest
keys) and the displacement buffers must be those the indices imply.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from itertools import accumulate
from typing import Any

import torch
from timm.layers import register_notrace_module
from torch import nn

from .focal_attention import KeyIndexedAttention, head_scale
from .focal_transformer import FocalBlock, FocalTransformer


def window_offsets(window_size: int) -> torch.Tensor:
    """(ws, ws, 2) int64 offset of each token of a window from its centre token (the released ``window_coords``).

    Offsets run from -(ws // 2) to ws - 1 - ws // 2: for an even window the centre is the lower-right middle token.
    """
    r = torch.arange(window_size) - window_size // 2
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), -1)


def grid_positions(height: int, width: int) -> torch.Tensor:
    """(height * width, 2) int64 (row, col) of the cells of a grid, row-major."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack((rows, cols), -1).view(-1, 2)


def squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, N) int64 squared Euclidean distance between query positions (Q, 2) and key positions (N, 2)."""
    return (queries[:, None] - keys[None]).pow(2).sum(-1)


def nearest_keys(queries: torch.Tensor, keys: torch.Tensor, top_k: int) -> torch.Tensor:
    """(Q, min(top_k, N)) int64 indices of the keys nearest to each query, nearest first.

    Like the release: ``torch.topk`` over negated float32 distances, so among equidistant keys at the cut the
    choice is torch's (implementation-defined). Released checkpoints store their choice; load it.
    """
    distances = squared_distances(queries, keys).float().sqrt()  # (Q, N)
    return torch.topk(-distances, min(top_k, keys.shape[0]), dim=1).indices


def key_displacements(
    queries: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, scale: int, offsets: torch.Tensor
) -> torch.Tensor:
    """(nW, ws^2, K, 2) float32 "query token minus key" displacement of every (query, selected key) pair.

    queries (nW, 2) and keys (N, 2) are positions in the level's grid, ``index`` (nW, K) selects keys, ``scale``
    converts that grid into tokens and ``offsets`` (ws, ws, 2) place the query tokens around their window's point.
    """
    window = (queries[:, None] - keys[index]) * scale  # (nW, K, 2)
    return (window[:, None] + offsets.reshape(1, -1, 1, 2)).float()


def index_problem(index: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> str | None:
    """Why ``index`` (nW, K) is not a choice of the K keys nearest to each query (ties broken any way), or None."""
    if index.dtype != torch.int64:
        return f"dtype {index.dtype}, expected torch.int64"
    if index.numel() and (index.min() < 0 or index.max() >= keys.shape[0]):
        return f"indices outside [0, {keys.shape[0]})"
    if (index.sort(1).values.diff(dim=1) == 0).any():
        return "a window selects the same key twice"
    distances = squared_distances(queries, keys)  # (nW, N)
    chosen = distances.gather(1, index).sort(1).values
    if not torch.equal(chosen, distances.sort(1).values[:, : index.shape[1]]):
        return f"not the {index.shape[1]} keys nearest to each window"
    return None


def coord_bias_mlp(head_dim: int, num_heads: int) -> nn.Sequential:
    """The released ``coord2rpb``: displacement (.., 2) -> bias per head (.., nH)."""
    return nn.Sequential(nn.Linear(2, head_dim), nn.ReLU(), nn.Linear(head_dim, num_heads))


class TopKFocalAttention(KeyIndexedAttention):
    """Attention of each window's tokens to the K nearest keys of every focal level, with an MLP position bias.

    Parameter and buffer names and shapes are those of the released v2 ``WindowAttention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_resolution: tuple[int, int],
        window_size: int,
        focal_level: int,
        top_k: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.scale = head_scale(dim, num_heads, qk_scale)
        if top_k < 1:
            raise ValueError(f"focal_topK must be at least 1, got {top_k}")
        self.dim = dim
        self.num_heads = num_heads
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.focal_level = focal_level
        self.top_k = top_k
        head_dim = dim // num_heads
        self.attn_drop = attn_drop

        self.register_buffer("window_coords", window_offsets(window_size))
        for level in range(focal_level):
            queries, keys, scale = self.level_grid(level)
            index = nearest_keys(queries, keys, top_k)
            self.register_buffer(f"topk_cloest_indice_{level}", index)
            self.register_buffer(
                f"topk_cloest_coords_{level}", key_displacements(queries, keys, index, scale, self.window_coords)
            )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.coord2rpb_all = nn.ModuleList(coord_bias_mlp(head_dim, num_heads) for _ in range(focal_level))

    def level_grid(self, level: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Query positions (nW, 2), key positions (N, 2) and grid-to-token scale of focal level ``level``.

        Level 0: window centres among the tokens of the map. Level >= 1: windows among the windows. Pooled map
        l >= 2 is 2^(l-1) times finer than the window grid, yet the release indexes it with these window-grid
        indices, so only its first nW tokens are ever keys (reproduced; see docs/released_semantics.md,
        "focal-fast level >= 2 quirk").
        """
        (H, W), ws = self.input_resolution, self.window_size
        windows = grid_positions(H // ws, W // ws)
        if level == 0:
            return windows * ws + ws // 2, grid_positions(H, W), 1
        return windows, windows, ws

    def key_index(self, level: int) -> torch.Tensor:
        """(nW, K_l) flat row-major indices of the keys of ``level`` in its map (the loaded released buffer)."""
        return self.get_buffer(f"topk_cloest_indice_{level}")

    def key_coords(self, level: int) -> torch.Tensor:
        """(nW, ws^2, K_l, 2) query-minus-key displacements of ``level`` (the loaded released buffer)."""
        return self.get_buffer(f"topk_cloest_coords_{level}")

    def loaded_buffer_problems(self, buffers: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Why buffers of a checkpoint (by local name, shapes already matching) do not fit this module.

        Index buffers must select, per window, K of the nearest keys of their level; the displacement buffers
        must be those their indices imply and ``window_coords`` the query offsets. See checkpoint_loading.py.
        """
        problems = {}
        offsets = window_offsets(self.window_size)
        if "window_coords" in buffers and not torch.equal(buffers["window_coords"], offsets):
            problems["window_coords"] = f"differs from the {self.window_size}x{self.window_size} window offsets"
        for level in range(self.focal_level):
            index_name, coords_name = f"topk_cloest_indice_{level}", f"topk_cloest_coords_{level}"
            if index_name not in buffers:
                continue
            queries, keys, scale = self.level_grid(level)
            problem = index_problem(buffers[index_name], queries, keys)
            if problem is not None:
                problems[index_name] = problem
            elif coords_name in buffers:
                implied = key_displacements(queries, keys, buffers[index_name], scale, offsets)
                if not torch.equal(buffers[coords_name].float(), implied):
                    problems[coords_name] = f"differs from the displacements that {index_name} implies"
        return problems

    def position_bias(self) -> torch.Tensor:
        """Bias of every query to every key slot, all levels in order: (nW, nH, ws^2, N)."""
        bias = torch.cat([mlp(self.key_coords(level)) for level, mlp in enumerate(self.coord2rpb_all)], 2)
        return bias.permute(0, 3, 1, 2)  # from (nW, ws^2, N, nH)

    def forward(self, x: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        """x: (shifted) map (B, H, W, C); pooled: maps of levels 1.. (B, h_l, w_l, C); returns (B, H, W, C)."""
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution:
            raise ValueError(f"focal-fast attention built for {self.input_resolution} got a {H}x{W} map")
        # Keys: the full-resolution map's, then each pooled map's; where each level's keys start.
        starts = [0, *accumulate((p.shape[1] * p.shape[2] for p in pooled), initial=H * W)]
        index = torch.cat([self.key_index(level) + starts[level] for level in range(self.focal_level)], 1)  # (nW, N)
        return self.attend_and_project(x, pooled, index, self.position_bias())

    def flops_per_window(self) -> int:
        """The released analytic count of one window: qkv, q k^T, the bias MLPs, attn v, proj.

        Released approximations: the bias MLP of level l >= 1 is counted for ws^2 / cell_l^2 queries (cell_l the
        pooling cell), and its cost as K * (2 hd + hd nH) per query.
        """
        ws, dim, nH = self.window_size, self.dim, self.num_heads
        hd, n = dim // nH, ws * ws
        flops = n * dim * 3 * dim + n * dim * dim
        for level in range(self.focal_level):
            n_keys = self.key_index(level).shape[1]
            n_queries = n if level == 0 else n // (ws // 2 ** (level - 1)) ** 2
            flops += 2 * nH * n * hd * n_keys + n_queries * n_keys * (2 * hd + hd * nH)
        return flops


@register_notrace_module  # reason: FocalBlock's, and checks the map's size (Python control flow on shapes)
class FocalFastBlock(FocalBlock):
    """The v2 block: FocalBlock with top-K attention. ``expand_size`` and ``focal_window`` are unused, as released."""

    def __init__(self, *args: Any, top_k: int, **kwargs: Any) -> None:
        super().__init__(*args, attn_kwargs=dict(top_k=top_k), **kwargs)

    def _check_config(self) -> None:
        """Refuse, with the reason, configurations on which the released v2 block crashes."""
        (H, W), ws = self.input_resolution, self.window_size
        if self.focal_level < 1:
            raise ValueError(f"focal-fast needs focal_level >= 1, got {self.focal_level}")
        if self.focal_level > 1 and not self.num_pooled_levels:
            raise ValueError(
                f"focal_level {self.focal_level} needs pooled maps: the stage must be in focal_stages and "
                "focal_pool must not be 'none'"
            )
        if H % ws or W % ws:
            raise ValueError(
                f"focal-fast does not pad: stage resolution {H}x{W} must be a multiple of the window {ws} "
                "(or at most the window)"
            )

    def _build_attention(
        self, num_heads: int, qkv_bias: bool, qk_scale: float | None, attn_drop: float, proj_drop: float, top_k: int
    ) -> nn.Module:
        """The top-K attention (``top_k`` keys per window and level), built on the CPU (its key choice uses ``topk``,
        which the meta device cannot run) and moved to the device the model is built on."""
        device = torch.get_default_device()
        with torch.device("cpu"):
            attention = TopKFocalAttention(
                self.dim,
                num_heads,
                self.input_resolution,
                self.window_size,
                self.focal_level,
                top_k,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
        return attention.to(device)

    def _attend(self, x: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.attn(x, pooled)

    def _attention_flops_per_window(self) -> int:
        return self.attn.flops_per_window()


class FocalTransformerV2(FocalTransformer):
    """Focal Transformer v2 ("focal-fast"). Keyword arguments are those of the released v2 constructor: v1's plus
    ``focal_topK``, the number of keys per window and level (fewer when the level has fewer)."""

    def __init__(self, *args: Any, focal_topK: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, block_fn=partial(FocalFastBlock, top_k=focal_topK), **kwargs)


__all__ = ["FocalTransformerV2", "FocalFastBlock", "TopKFocalAttention"]
