"""Resampling of position parameters when a checkpoint meets a model of another resolution.

Relative position bias tables follow unilm's fine-tuning code: the source offsets are stretched on a
geometric progression so that the outermost one lands on the new outermost offset, then a bicubic
interpolating spline (scipy's ``interp2d(kind='cubic')``, i.e. a not-a-knot spline) or, as timm does by
default, piecewise-linear interpolation gives the new offsets. The last three rows (the cls relations) are
kept as they are.
"""

import math

import numpy as np
import paddle
import paddle.nn.functional as F

from config import REL_POS_INTERPOLATIONS

NUM_CLS_RELATIONS = 3


def geometric_source_offsets(src_side: int, dst_side: int) -> np.ndarray:
    """Where the ``src_side`` offsets of the old table sit on the new table's offset axis."""
    half_src, half_dst = src_side // 2, dst_side // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        ratio = (low + high) / 2.0
        if (1.0 - ratio ** half_src) / (1.0 - ratio) > half_dst:
            high = ratio
        else:
            low = ratio
    steps = np.cumsum(ratio ** np.arange(half_src))
    return np.concatenate([-steps[::-1], [0.0], steps])


def cubic_spline_matrix(knots: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Matrix W with W @ y = the not-a-knot cubic spline through (knots, y) evaluated at targets.

    Targets outside the knots are clamped to the ends, as FITPACK's evaluation does.
    """
    n = len(knots)
    if n < 4:
        raise ValueError(f'cubic resampling needs a table of at least 4x4 offsets, got {n}x{n}; '
                         'use linear interpolation')
    h = np.diff(knots)
    lhs, rhs = np.zeros((n, n)), np.zeros((n, n))
    for i in range(1, n - 1):  # continuity of the first derivative at interior knots
        lhs[i, i - 1:i + 2] = h[i - 1], 2.0 * (h[i - 1] + h[i]), h[i]
        rhs[i, i - 1:i + 2] = 6.0 / h[i - 1], -6.0 / h[i - 1] - 6.0 / h[i], 6.0 / h[i]
    lhs[0, :3] = h[1], -(h[0] + h[1]), h[0]  # not-a-knot: third derivative continuous at knots 1, n-2
    lhs[-1, -3:] = h[-1], -(h[-2] + h[-1]), h[-2]
    second_derivatives = np.linalg.solve(lhs, rhs)
    targets = np.clip(targets, knots[0], knots[-1])
    interval = np.clip(np.searchsorted(knots, targets) - 1, 0, n - 2)
    width = h[interval][:, None]
    left = (knots[interval + 1] - targets)[:, None]
    right = (targets - knots[interval])[:, None]
    identity = np.eye(n)
    return (second_derivatives[interval] * (left ** 3 / (6 * width) - width * left / 6)
            + second_derivatives[interval + 1] * (right ** 3 / (6 * width) - width * right / 6)
            + identity[interval] * left / width + identity[interval + 1] * right / width)


def linear_matrix(knots: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Matrix W with W @ y = piecewise-linear interpolation, clamped at the ends."""
    return np.stack([np.interp(targets, knots, column) for column in np.eye(len(knots))], axis=1)


def resample_rel_pos_table(table: np.ndarray, new_grid: tuple[int, int], method: str = 'cubic') -> np.ndarray:
    """Resample a [(2S-1)^2 + 3, heads] table of a square S x S grid to ``new_grid``."""
    if method not in REL_POS_INTERPOLATIONS:
        raise ValueError(f'relative position interpolation must be one of {REL_POS_INTERPOLATIONS}, got {method!r}')
    num_offsets = table.shape[0] - NUM_CLS_RELATIONS
    src_side = math.isqrt(num_offsets)
    if src_side * src_side != num_offsets:
        raise ValueError(f'a relative position table of {table.shape[0]} rows does not belong to a square grid')
    dst_sides = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    weights = []
    for dst_side in dst_sides:
        knots = geometric_source_offsets(src_side, dst_side)
        targets = np.arange(dst_side, dtype=np.float64) - dst_side // 2
        build = cubic_spline_matrix if method == 'cubic' else linear_matrix
        weights.append(build(knots, targets))
    grid = table[:num_offsets].astype(np.float64).reshape(src_side, src_side, -1)
    resampled = np.einsum('ij,jkh,lk->ilh', weights[0], grid, weights[1]).reshape(-1, table.shape[1])
    return np.concatenate([resampled, table[num_offsets:]]).astype(table.dtype)


def resample_abs_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
    """Bicubic resize (align_corners=False, as unilm) of a [1, 1 + S*S, D] embedding; the cls slot is kept."""
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f'a position embedding of {num_patches} patches does not belong to a square grid')
    patches = paddle.to_tensor(pos_embed[:, 1:].astype('float32'))
    patches = patches.reshape([1, side, side, -1]).transpose([0, 3, 1, 2])
    patches = F.interpolate(patches, size=list(new_grid), mode='bicubic', align_corners=False)
    patches = patches.transpose([0, 2, 3, 1]).reshape([1, new_grid[0] * new_grid[1], -1]).numpy()
    return np.concatenate([pos_embed[:, :1], patches.astype(pos_embed.dtype)], axis=1)
