"""Grids, scale formats and scale layouts against float64 references with fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.grids import (E2M1, E4M3, FP8_MAX, activation_divisor, global_scale, grid_for, round_minifloat,
                            round_to_grid, symmetric_scale, weight_divisor)
from quantkit.scale_layout import ScaleLayout

# E2M1 magnitudes and whether their mantissa bit is even (the tie-break).
E2M1_VALUES = [(0.0, True), (0.5, False), (1.0, True), (1.5, False), (2.0, True), (3.0, False), (4.0, True),
               (6.0, False)]


def _samples(seed: int, n: int = 4000, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0], dtype=torch.float64)
    return torch.cat([x, ties, -ties, torch.zeros(1, dtype=torch.float64)])


def _ref_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value by exhaustive search over the grid, ties to the even mantissa,
    saturating at 6."""
    values = torch.tensor([v for v, _ in E2M1_VALUES], dtype=torch.float64)
    even = torch.tensor([e for _, e in E2M1_VALUES])
    a = x.double().abs().clamp_max(6.0)
    d = (a[:, None] - values[None]).abs()
    nearest = d == d.amin(dim=1, keepdim=True)
    pick = (nearest.long() * 2 + (nearest & even).long()).argmax(dim=1)
    return torch.copysign(values[pick], x.double())


@pytest.mark.parametrize("seed", [0, 1])
def test_e2m1_rounding_is_nearest_ties_to_even(seed):
    x = _samples(seed)
    got = round_to_grid(x.float(), E2M1).double()
    torch.testing.assert_close(got, _ref_e2m1(x.float().double()), rtol=0, atol=0)
    assert E2M1.max == 6.0 and E2M1.code_dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("seed", [2, 3])
def test_generic_minifloat_rounding_reproduces_the_e4m3_cast(seed):
    """The minifloat rule, run with E4M3's widths, gives torch's float8_e4m3fn cast
    (normals, subnormals and saturation), so the rule is right and E2M1 uses it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-4, 3, (20000,), generator=g),
                   torch.tensor([500.0, -1e4, 2.0**-10, 3 * 2.0**-11])])
    want = x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(round_minifloat(x, E4M3), want, rtol=0, atol=0)


def test_int_grids_and_divisors():
    g4 = grid_for("int", 4)
    assert (g4.qmin, g4.qmax, weight_divisor(g4), activation_divisor(grid_for("int", 8))) == (-8, 7, 7.5, 127)
    x = torch.tensor([-9.0, -7.5, -0.5, 0.5, 1.5, 6.6, 99.0])
    assert round_to_grid(x, g4).tolist() == [-8, -8, 0, 0, 2, 7, 7]
    assert weight_divisor(E2M1) == 6.0 and weight_divisor(E4M3) == 448.0
    with pytest.raises(ValueError):
        grid_for("float", 6)


@pytest.mark.parametrize("seed", [4, 5])
def test_e8m0_scales_follow_the_mx_rule(seed):
    """Power-of-two scale ``2**(e - 2)`` for FP4, where ``2**e`` is amax's binade, one higher
    when amax's mantissa is at least 1.75; no group value then lands beyond 8 steps."""
    g = torch.Generator().manual_seed(seed)
    amax = (torch.rand(5000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 4, (5000,), generator=g))
    amax = torch.cat([amax, torch.tensor([1.75, 1.7499, 3.5, 0.875, 6.0], dtype=torch.float64)]).float()
    got = symmetric_scale(amax, 6.0, "e8m0").double()
    want = []
    for a in amax.double().tolist():
        e = math.floor(math.log2(a))
        want.append(2.0 ** (e + (a / 2**e >= 1.75) - 2))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)
    ratio = amax.double() / got
    assert bool(((ratio >= 3.5) & (ratio < 7.0)).all())


@pytest.mark.parametrize("seed", [6, 7])
def test_nvfp4_global_and_e4m3_scales(seed):
    g = torch.Generator().manual_seed(seed)
    amax_groups = torch.rand(64, generator=g) * 3
    amax_groups[5] = 0.0
    gs = global_scale(amax_groups.max(), E2M1)
    torch.testing.assert_close(gs.double(), torch.tensor([448.0 * 6.0], dtype=torch.float64) / amax_groups.max().double(),
                               rtol=1e-7, atol=0)
    local = symmetric_scale(amax_groups, 6.0, "e4m3", gs)
    want = (amax_groups.double() / 6.0 * gs.double()).float().to(torch.float8_e4m3fn).double()
    want[5] = 0.125  # an all-zero group: any scale codes it exactly
    torch.testing.assert_close(local.double(), want, rtol=0, atol=0)
    assert float(local.max()) <= 448.0 and float(local.max()) >= 416.0  # the largest group uses E4M3's top
    assert global_scale(torch.tensor(0.0), E2M1).item() == 1.0
    with pytest.raises(ValueError):
        symmetric_scale(amax_groups, 6.0, "e4m3")


LAYOUTS = [ScaleLayout("tensor"), ScaleLayout("row"), ScaleLayout("group", group=16),
           ScaleLayout("block", block=(32, 32)), ScaleLayout("block", block=(48, 40))]


def _entry(layout: ScaleLayout, r: int, c: int) -> tuple:
    """The scale entry element (r, c) belongs to, written out per kind."""
    if layout.kind == "tensor":
        return (0,)
    if layout.kind == "row":
        return (r, 0)
    if layout.kind == "group":
        return (r, c // layout.group)
    return (r // layout.block[0], c // layout.block[1])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.kind}{l.group or l.block or ''}")
def test_layout_reduce_and_expand_match_elementwise_reference(layout):
    rows, cols = 80, 112  # blocks of 48x40 leave partial edge blocks
    if layout.kind == "group":
        cols = 96
    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    shape = layout.shape(rows, cols)
    want_max = torch.full(shape, -math.inf, dtype=torch.float64)
    want_min = torch.full(shape, math.inf, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            e = _entry(layout, r, c)
            want_max[e] = max(want_max[e].item(), x[r, c].item())
            want_min[e] = min(want_min[e].item(), x[r, c].item())
    torch.testing.assert_close(layout.reduce(x).double(), want_max.float().double(), rtol=0, atol=0)
    if layout.kind != "block" or (rows % layout.block[0] == 0 and cols % layout.block[1] == 0):
        # zero padding only touches partial blocks' ranges, which are clamped to include 0 anyway
        torch.testing.assert_close(layout.reduce(x, torch.amin).double(), want_min.float().double(), rtol=0, atol=0)
    t = torch.randn(shape, generator=g)
    full = layout.expand(t, rows, cols)
    assert full.shape == (rows, cols)
    for r, c in [(0, 0), (rows - 1, cols - 1), (37, 41), (47, 39), (48, 40)]:
        assert full[r, c] == t[_entry(layout, r, c)]


def test_group_expand_follows_g_idx_and_rows_split_by_layout():
    layout = ScaleLayout("group", group=4)
    t = torch.arange(6.0).reshape(2, 3)
    g_idx = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0, 2, 0, 1, 2], dtype=torch.int32)
    assert layout.expand(t, 2, 12, g_idx)[1].tolist() == [5, 3, 4, 5, 3, 4, 4, 3, 5, 3, 4, 5]
    block = ScaleLayout("block", block=(4, 4))
    parts = block.split_rows(torch.arange(12.0).reshape(6, 2), [8, 8, 6])
    assert [p.shape[0] for p in parts] == [2, 2, 2]
    with pytest.raises(ValueError):
        block.split_rows(torch.zeros(3, 2), [6, 6])
    assert [p.item() for p in ScaleLayout("tensor").split_rows(torch.tensor([2.0]), [3, 5])] == [2.0, 2.0]
