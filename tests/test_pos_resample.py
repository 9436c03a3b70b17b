"""Resampling for a new resolution, against scipy (unilm's interp2d cubic), timm (linear) and torch (bicubic)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

from pos_resample import cubic_spline_matrix, geometric_source_offsets, resample_abs_pos_embed, resample_rel_pos_table

GRID_CHANGES = [(14, 24), (14, 32), (24, 14), (4, 7)]  # 224->384, 224->512, 384->224, tiny


def random_table(grid, heads=3, seed=0):
    rows = (2 * grid - 1) ** 2 + 3
    return np.random.default_rng(seed).standard_normal((rows, heads)).astype(np.float32)


@pytest.mark.parametrize('src, dst', GRID_CHANGES)
def test_geometric_offsets_reach_the_new_border(src, dst):
    offsets = geometric_source_offsets(2 * src - 1, 2 * dst - 1)
    assert len(offsets) == 2 * src - 1 and offsets[src - 1] == 0
    np.testing.assert_allclose(offsets, -offsets[::-1])
    assert np.all(np.diff(offsets) > 0)
    if (src, dst) in ((14, 24), (14, 32)):  # the zoo's changes; unilm caps the ratio at 1.5 for tiny grids
        assert offsets[-1] == pytest.approx(dst - 1, abs=1e-3)  # bisection on the ratio stops at 1e-6


@pytest.mark.parametrize('src, dst', GRID_CHANGES)
def test_cubic_matches_scipy_bicubic_spline(src, dst):
    """scipy's interp2d(kind='cubic') (what unilm calls) is FITPACK's s=0 spline, as RectBivariateSpline."""
    table = random_table(src)
    ours = resample_rel_pos_table(table, (dst, dst), 'cubic')
    side, new_side = 2 * src - 1, 2 * dst - 1
    knots = geometric_source_offsets(side, new_side)
    targets = np.arange(new_side) - new_side // 2
    for head in range(table.shape[1]):
        grid = table[:side * side, head].reshape(side, side).astype(np.float64)
        spline = RectBivariateSpline(knots, knots, grid, kx=3, ky=3, s=0)
        expected = spline(np.clip(targets, knots[0], knots[-1]), np.clip(targets, knots[0], knots[-1]))
        np.testing.assert_allclose(ours[:-3, head], expected.reshape(-1), atol=1e-5)
    np.testing.assert_array_equal(ours[-3:], table[-3:])


@pytest.mark.parametrize('src, dst', GRID_CHANGES)
def test_linear_matches_timm(src, dst):
    table = random_table(src)
    ours = resample_rel_pos_table(table, (dst, dst), 'linear')
    expected = resize_rel_pos_bias_table(torch.from_numpy(table), (dst, dst), ours.shape).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_spline_reproduces_cubic_polynomials():
    knots = np.array([-7.0, -3.5, -1.2, 0.0, 1.2, 3.5, 7.0])
    targets = np.linspace(-7, 7, 29)
    cubic = lambda x: 0.3 * x ** 3 - x ** 2 + 2 * x - 5  # noqa: E731
    np.testing.assert_allclose(cubic_spline_matrix(knots, targets) @ cubic(knots), cubic(targets), atol=1e-9)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match='square grid'):
        resample_rel_pos_table(np.zeros((50, 2), np.float32), (7, 7))
    with pytest.raises(ValueError, match='must be one of'):
        resample_rel_pos_table(random_table(4), (7, 7), 'nearest')
    with pytest.raises(ValueError, match='at least 4x4'):
        resample_rel_pos_table(random_table(1), (7, 7), 'cubic')


@pytest.mark.parametrize('src, dst', [(14, 24), (24, 14), (4, 7)])
def test_abs_pos_embed_is_unilms_bicubic(src, dst):
    pos_embed = np.random.default_rng(1).standard_normal((1, src * src + 1, 8)).astype(np.float32)
    ours = resample_abs_pos_embed(pos_embed, (dst, dst))
    patches = torch.from_numpy(pos_embed[:, 1:]).reshape(1, src, src, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, size=(dst, dst), mode='bicubic', align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, dst * dst, 8).numpy()
    np.testing.assert_allclose(ours[:, 1:], expected, atol=1e-5)
    np.testing.assert_array_equal(ours[:, :1], pos_embed[:, :1])
