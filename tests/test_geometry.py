"""The pure index and mask builders of models/focal_geometry.py against docs/released_semantics.md ("Ring of neighbour
keys", "Pooled levels", "Masks")."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from models.focal_attention import ring_size
from models.focal_geometry import (
    MASK_VALUE,
    key_layout,
    pooled_key_index,
    pooled_level,
    pooled_window_size,
    relative_position_index,
    released_valid_ind_rolled,
    released_valid_ind_unfold,
    ring_key_index,
    ring_offsets,
    shift_attn_mask,
    unfold_kernel_size,
    window_key_index,
    window_partition,
    window_reverse,
)


def _full_ring(ws: int, e: int) -> set[tuple[int, int]]:
    """Every token within e of a ws x ws window (offsets from its top-left token), the window excluded."""
    return {(r, c) for r in range(-e, ws + e) for c in range(-e, ws + e) if not (0 <= r < ws and 0 <= c < ws)}


# ---- the expanded ring ----------------------------------------------------------------------------------

# (ws, e) -> (entries, distinct ring tokens, duplicates) where ws >= 2e: 4*e*(ws-2e) duplicates.
RING_DUPLICATES = {
    (7, 3): (132, 120, 12),
    (5, 2): (64, 56, 8),
    (6, 2): (80, 64, 16),
    (8, 3): (156, 132, 24),
    (3, 1): (20, 16, 4),
}


@pytest.mark.parametrize("ws, e", list(RING_DUPLICATES), ids=lambda v: str(v))
def test_ring_covers_the_full_ring_with_released_duplicates(ws, e):
    entries, distinct, duplicates = RING_DUPLICATES[(ws, e)]
    offsets = ring_offsets(ws, e)
    assert len(offsets) == entries == ring_size(ws, e)
    assert set(offsets) == _full_ring(ws, e)
    assert len(set(offsets)) == distinct
    assert sum(n - 1 for n in Counter(offsets).values()) == duplicates == 4 * e * (ws - 2 * e)


def test_ring_duplicates_of_window7_expand3_are_the_strip_middles():
    counts = Counter(ring_offsets(7, 3))
    duplicated = {offset for offset, n in counts.items() if n > 1}
    expected = (
        {(r, 3) for r in (-3, -2, -1)}
        | {(r, 3) for r in (7, 8, 9)}
        | {(3, c) for c in (-3, -2, -1)}
        | {(3, c) for c in (7, 8, 9)}
    )
    assert duplicated == expected
    assert all(counts[offset] == 2 for offset in expected)


def test_ring_groups_follow_the_released_roll_order():
    """Entries come in 4 groups (roll(-e,-e), roll(-e,+e), roll(+e,-e), roll(+e,+e)), ws^2-(ws-e)^2 each."""
    ws, e = 7, 3
    offsets = ring_offsets(ws, e)
    per_group = ws * ws - (ws - e) ** 2
    groups = [offsets[i * per_group : (i + 1) * per_group] for i in range(4)]
    assert all(ws <= r or ws <= c for r, c in groups[0])  # bottom / right
    assert all(ws <= r or c < 0 for r, c in groups[1])  # bottom / left
    assert all(r < 0 or ws <= c for r, c in groups[2])  # top / right
    assert all(r < 0 or c < 0 for r, c in groups[3])  # top / left
    for group in groups:
        assert group == sorted(group)  # row-major inside each rolled window


def test_ring_of_window4_expand3_misses_24_tokens():
    offsets = ring_offsets(4, 3)
    full = _full_ring(4, 3)
    assert len(offsets) == 60 == ring_size(4, 3)
    assert len(full) == 84
    assert set(offsets) <= full
    assert len(full - set(offsets)) == 24
    assert len(set(offsets)) == 60  # no duplicates when ws < 2e


def test_ring_with_expand_equal_to_window_is_the_four_diagonal_windows():
    offsets = ring_offsets(3, 3)
    assert len(offsets) == 36 == ring_size(3, 3)
    diagonal = {(r, c) for r in [*range(-3, 0), *range(3, 6)] for c in [*range(-3, 0), *range(3, 6)]}
    assert set(offsets) == diagonal


@pytest.mark.parametrize("ws, e", [*RING_DUPLICATES, (4, 3), (3, 3), (2, 1), (7, 1)], ids=lambda v: str(v))
def test_ring_never_contains_window_tokens(ws, e):
    assert not [(r, c) for r, c in ring_offsets(ws, e) if 0 <= r < ws and 0 <= c < ws]


def test_released_valid_ind_rolled_indexes_the_four_rolled_windows():
    index = released_valid_ind_rolled(7, 3)
    assert index.dtype == torch.int64
    assert index.shape == (132,)
    assert index.min() >= 0 and index.max() < 4 * 49
    assert torch.all(index[1:] > index[:-1])


def test_ring_wraps_around_the_map_like_torch_roll():
    """Window (0, 0) of a 28x28 map takes its top-left ring tokens from rows/cols 25..27."""
    ws, e, side = 7, 3, 28
    index = ring_key_index(side, side, ws, e)
    assert index.shape == (16, 132)
    offsets = ring_offsets(ws, e)
    top_left = {divmod(flat, side) for flat, (r, c) in zip(index[0].tolist(), offsets) if r < 0 and c < 0}
    assert top_left == {(r, c) for r in (25, 26, 27) for c in (25, 26, 27)}
    rows = {divmod(flat, side)[0] for flat, (r, _) in zip(index[0].tolist(), offsets) if r < 0}
    assert rows == {25, 26, 27}


def test_ring_key_index_matches_rolled_windows():
    """Gathering with ring_key_index equals the released construction: 4 rolls, window partition, valid_ind."""
    ws, e, side = 7, 3, 21
    x = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
    rolled = [
        torch.roll(x, shifts=(-e, -e), dims=(1, 2)),
        torch.roll(x, shifts=(-e, e), dims=(1, 2)),
        torch.roll(x, shifts=(e, -e), dims=(1, 2)),
        torch.roll(x, shifts=(e, e), dims=(1, 2)),
    ]
    windows = torch.cat([window_partition(t, ws) for t in rolled], 2)[0, :, :, 0]  # (nW, 4*ws*ws)
    released = windows[:, released_valid_ind_rolled(ws, e)].long()
    assert torch.equal(ring_key_index(side, side, ws, e), released)


# ---- windows ----------------------------------------------------------------------------------------------


def test_window_partition_and_reverse_round_trip():
    x = torch.randn(2, 14, 21, 3)
    windows = window_partition(x, 7)
    assert windows.shape == (2, 6, 49, 3)
    assert torch.equal(window_reverse(windows, 7, 14, 21), x)


def test_window_partition_orders_windows_and_tokens_row_major():
    x = torch.arange(14 * 21).view(1, 14, 21, 1)
    windows = window_partition(x, 7)[0, :, :, 0]
    assert windows[1, 0] == x[0, 0, 7, 0]  # second window: same rows, next columns
    assert windows[3, 0] == x[0, 7, 0, 0]  # first window of the second row
    assert windows[0, 8] == x[0, 1, 1, 0]  # token 8 of a 7x7 window is (1, 1)
    assert torch.equal(window_key_index(14, 21, 7), windows)


# ---- relative position indices ------------------------------------------------------------------------------


@pytest.mark.parametrize("q_size, k_size", [(7, 7), (7, 1), (7, 3), (7, 5), (7, 8), (5, 6), (4, 4)])
def test_relative_position_index_formula(q_size, k_size):
    index = relative_position_index(q_size, k_size)
    assert index.shape == (q_size**2, k_size**2)
    side = q_size + k_size - 1
    for qi in range(q_size):
        for qj in range(q_size):
            for ki in range(k_size):
                for kj in range(k_size):
                    expected = (qi - ki + k_size - 1) * side + (qj - kj + k_size - 1)
                    assert index[qi * q_size + qj, ki * k_size + kj] == expected
    assert index.min() >= 0 and index.max() < side * side


def test_relative_position_index_is_swins_for_a_window():
    ws = 7
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    swin = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    assert torch.equal(relative_position_index(ws, ws), swin)


# ---- pooled levels ------------------------------------------------------------------------------------------


def test_pooled_level_centre_trim_of_56_map_at_level1():
    level = pooled_level(56, 56, 7, 1)
    assert (level.cell, level.grid_h, level.grid_w) == (3, 16, 16)
    kept = range(level.trim_top, level.trim_top + level.grid_h * level.cell)
    assert (kept.start, kept.stop - 1) == (4, 51)


def test_pooled_level_gives_the_extra_trimmed_row_to_the_bottom():
    level = pooled_level(35, 35, 7, 1)  # 30 rows kept out of 35
    assert (level.cell, level.grid_h) == (3, 10)
    assert level.trim_top == 2  # and 3 rows are dropped at the bottom


@pytest.mark.parametrize("ws, k", [(ws, k) for ws in range(2, 9) for k in range(3) if 2**k <= ws])
def test_pooled_level_only_ever_trims(ws, k):
    level = pooled_level(3 * ws, 2 * ws, ws, k)
    assert level.cell * 2**k <= ws
    assert (level.grid_h, level.grid_w) == (3 * 2**k, 2 * 2**k)
    assert 0 <= level.trim_top and 0 <= level.trim_left


def test_pooled_level_zero_is_one_cell_per_window():
    level = pooled_level(56, 56, 7, 0)
    assert (level.cell, level.grid_h, level.trim_top) == (7, 8, 0)


@pytest.mark.parametrize("fw, k", [(7, 0), (5, 0), (3, 0), (1, 0), (7, 1), (5, 1), (3, 1), (1, 1), (3, 2)])
def test_unfold_and_pooled_window_sizes(fw, k):
    assert unfold_kernel_size(fw, k) == fw + 2 ** (k + 1) - 2
    assert pooled_window_size(fw, k) == fw + 2**k - 1
    assert released_valid_ind_unfold(fw, k).numel() == pooled_window_size(fw, k) ** 2


def test_pooled_neighbourhood_is_centred_on_the_window():
    index, valid = pooled_key_index(8, 8, focal_window=7, level=0)
    assert index.shape == valid.shape == (64, 49)
    window = 2 * 8 + 5  # window (2, 5)
    cells = {divmod(i, 8) for i, ok in zip(index[window].tolist(), valid[window].tolist()) if ok}
    assert cells == {(r, c) for r in range(0, 6) for c in range(2, 8)}
    index, valid = pooled_key_index(16, 16, focal_window=7, level=1)
    assert index.shape == (64, 64)  # K = fw + 1 = 8
    window = 3 * 8 + 3  # its own cells are (6..7, 6..7); 3 more on each side
    rows = sorted({divmod(i, 16)[0] for i in index[window].tolist()})
    assert rows == list(range(3, 11))
    assert valid[window].all()


def test_pooled_neighbourhood_outside_the_map_is_invalid():
    index, valid = pooled_key_index(8, 8, focal_window=7, level=0)
    assert valid[0].sum() == 16  # window (0, 0) sees rows/cols 0..3 only
    assert valid[9].sum() == 25  # window (1, 1): rows/cols 0..4
    assert valid[27].all()  # window (3, 3) is 3 cells from every border
    index, valid = pooled_key_index(1, 1, focal_window=1, level=0)
    assert valid.all() and index.tolist() == [[0]]


@pytest.mark.parametrize(
    "grid_windows, fw, k", [(8, 7, 0), (4, 5, 0), (2, 3, 0), (8, 7, 1), (4, 5, 1), (3, 3, 1), (2, 3, 2)]
)
def test_pooled_key_index_matches_released_unfold(grid_windows, fw, k):
    """The released nn.Unfold + valid_ind_unfold_k selection picks the same cells, zero padding included."""
    grid = grid_windows * 2**k
    cells = torch.arange(1, grid * grid + 1, dtype=torch.float64).view(1, 1, grid, grid)  # 0 = padding
    kernel = unfold_kernel_size(fw, k)
    unfolded = F.unfold(cells, kernel_size=kernel, stride=2**k, padding=kernel // 2)[0]  # (kernel^2, nW)
    released = unfolded[released_valid_ind_unfold(fw, k)].t().long()  # (nW, K^2)
    index, valid = pooled_key_index(grid, grid, fw, k)
    assert torch.equal(valid, released > 0)
    assert torch.equal(torch.where(valid, index + 1, 0), released)


# ---- masks --------------------------------------------------------------------------------------------------


def _token(r: int, c: int, ws: int = 7) -> int:
    return r * ws + c


def test_shift_mask_values():
    mask = shift_attn_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE} == {0.0, -100.0}
    assert torch.equal(mask, mask.transpose(1, 2))
    assert not mask[0].any()  # the top-left window is one region
    # last window: rows/cols 7..10 and 11..13 are different regions (4 regions in all)
    assert mask[3, _token(0, 0), _token(3, 3)] == 0
    assert mask[3, _token(0, 0), _token(4, 0)] == MASK_VALUE
    assert mask[3, _token(0, 0), _token(0, 4)] == MASK_VALUE
    assert mask[3, _token(4, 4), _token(6, 6)] == 0
    # top-right window: columns 7..10 vs 11..13
    assert mask[1, _token(0, 0), _token(6, 3)] == 0 and mask[1, _token(0, 0), _token(0, 4)] == MASK_VALUE
    assert (mask[3] == 0).sum() == 16 * 16 + 2 * 12 * 12 + 9 * 9  # regions of 16, 12, 12 and 9 tokens


def test_shift_mask_of_a_single_window_map_is_regions_only():
    mask = shift_attn_mask(7, 7, 7, 3)
    assert mask.shape == (1, 49, 49)
    assert (mask == 0).sum() == 16 * 16 + 2 * 12 * 12 + 9 * 9


# ---- key layout ---------------------------------------------------------------------------------------------

# Focal-T at 224: (padded side, ws, expand, focal window, pooled levels) -> keys per window
FOCAL_T_STAGES = {
    "stage0": ((56, 7, 3, 7, 1), 49 + 132 + 49),
    "stage1": ((28, 7, 3, 5, 1), 49 + 132 + 25),
    "stage2": ((14, 7, 3, 3, 1), 49 + 132 + 9),
    "stage3": ((7, 7, 0, 1, 1), 49 + 0 + 1),
}


@pytest.mark.parametrize("stage", list(FOCAL_T_STAGES))
def test_key_counts_of_focal_tiny(stage):
    (side, ws, e, fw, levels), n_keys = FOCAL_T_STAGES[stage]
    key_index, key_mask = key_layout(side, side, ws, e, fw, levels, 0)
    n_windows = (side // ws) ** 2
    assert key_index.shape == (n_windows, n_keys)
    assert key_mask.shape == (n_windows, ws * ws, n_keys)
    assert (230, 206, 190, 50)[int(stage[-1])] == n_keys


def test_focal_level3_adds_64_level1_keys_at_stage0():
    key_index, _ = key_layout(56, 56, 7, 3, 7, 2, 0)
    assert key_index.shape == (64, 230 + 64)


def test_key_layout_order_and_sources():
    side, ws, e, fw = 14, 7, 3, 3
    key_index, key_mask = key_layout(side, side, ws, e, fw, 1, 0)
    assert torch.equal(key_index[:, :49], window_key_index(side, side, ws))
    assert torch.equal(key_index[:, 49:181], ring_key_index(side, side, ws, e))
    index, valid = pooled_key_index(2, 2, fw, 0)
    zero_slot = side * side + 4
    assert torch.equal(key_index[:, 181:], torch.where(valid, index + side * side, zero_slot))
    assert not key_mask[:, :, :181].any()  # window and ring keys are never masked without shift
    assert torch.equal(key_mask[:, :, 181:] == MASK_VALUE, (~valid)[:, None, :].expand(4, 49, 9))


def test_key_layout_applies_shift_mask_to_window_keys_only():
    side, ws, e = 14, 7, 3
    key_index, key_mask = key_layout(side, side, ws, e, 3, 1, 3)
    assert torch.equal(key_mask[:, :, :49], shift_attn_mask(side, side, ws, 3))
    assert not key_mask[:, :, 49:181].any()


def test_key_layout_without_ring_or_pooling_is_the_window():
    key_index, key_mask = key_layout(14, 14, 7, 0, 3, 0, 0)
    assert torch.equal(key_index, window_key_index(14, 14, 7))
    assert not key_mask.any()
