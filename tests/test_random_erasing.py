"""random_erasing.py against timm 1.0.31's RandomErasing: boxes seed for seed, area and probability
statistics, fill values per mode, batch splits and errors."""
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data.random_erasing import RandomErasing as TimmRandomErasing

from config import RANDOM_ERASE_MODES as MODES
from random_erasing import RandomErasing

SHAPE = (3, 20, 28)


def _erased_mask(image) -> np.ndarray:
    """Pixels changed from the all-ones input (normal fills never land exactly on 1.0)."""
    return (np.asarray(image) != 1.0).any(axis=0)


def _ours(seed: int, eraser: RandomErasing, shape=SHAPE) -> np.ndarray:
    random.seed(seed)
    np.random.seed(seed)
    return eraser(np.ones(shape, dtype=np.float32))


def _theirs(seed: int, eraser: TimmRandomErasing, shape=SHAPE) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    return eraser(torch.ones(shape))


@pytest.mark.parametrize('mode', MODES)
def test_boxes_equal_timm_seed_for_seed(mode):
    """Same Python seed, same boxes: probability, count in [1, 3], area, aspect and position all agree."""
    ours = RandomErasing(0.5, mode=mode, max_count=3)
    theirs = TimmRandomErasing(0.5, mode=mode, max_count=3, device='cpu')
    erased = 0
    for seed in range(400):
        mask = _erased_mask(_ours(seed, ours))
        assert np.array_equal(mask, _erased_mask(_theirs(seed, theirs))), seed
        erased += mask.any()
    assert 150 < erased < 250


def test_area_and_probability_statistics_match_timm():
    """Independent seeds, 4000 draws each, on 3x32x32 arrays with timm's defaults for BEiT (p 0.25, one box):
    the erase rate agrees with timm's within 4 standard errors of the difference, the erased-area fraction has
    the same distribution (two-sample KS test, p > 0.001) and mean (4 standard errors)."""
    draws, shape = 4000, (3, 32, 32)
    ours = RandomErasing(0.25, mode='pixel')
    theirs = TimmRandomErasing(0.25, mode='pixel', device='cpu')
    our_areas = np.array([_erased_mask(_ours(seed, ours, shape)).mean() for seed in range(draws)])
    their_areas = np.array([_erased_mask(_theirs(seed, theirs, shape)).mean()
                            for seed in range(draws, 2 * draws)])
    our_rate, their_rate = (our_areas > 0).mean(), (their_areas > 0).mean()
    assert abs(our_rate - their_rate) <= 4 * math.sqrt(2 * 0.25 * 0.75 / draws), (our_rate, their_rate)
    assert abs(our_rate - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / draws)
    our_boxes, their_boxes = our_areas[our_areas > 0], their_areas[their_areas > 0]
    assert stats.ks_2samp(our_boxes, their_boxes).pvalue > 1e-3
    std_error = math.sqrt(our_boxes.var() / len(our_boxes) + their_boxes.var() / len(their_boxes))
    assert abs(our_boxes.mean() - their_boxes.mean()) <= 4 * std_error
    assert our_boxes.min() >= 0.02 * 0.5 and our_boxes.max() <= 1 / 3 * 1.5  # rounding of h and w only


def _boxes(mode: str, draws: int = 300):
    """(erased image, its box mask) for draws that erased something; one box, always."""
    eraser = RandomErasing(1.0, mode=mode)
    for seed in range(draws):
        image = _ours(seed, eraser)
        mask = _erased_mask(image)
        if mask.any():
            yield image, mask


def test_const_fill_is_exactly_zero():
    for image, mask in _boxes('const'):
        assert np.all(image[:, mask] == 0.0) and np.all(image[:, ~mask] == 1.0)


def test_rand_fill_is_one_normal_colour_per_box():
    colours = []
    for image, mask in _boxes('rand'):
        box = image[:, mask]
        assert np.all(box == box[:, :1]), 'constant within the box, per channel'
        assert len(set(box[:, 0])) == 3, 'channels differ'
        assert np.all(image[:, ~mask] == 1.0)
        colours.append(box[:, 0])
    colours = np.concatenate(colours)
    assert abs(colours.mean()) <= 4 / math.sqrt(len(colours)) and abs(colours.std() - 1) <= 0.1


def test_pixel_fill_is_normal_noise_per_pixel():
    values = []
    for image, mask in _boxes('pixel'):
        box = image[:, mask]
        assert len(np.unique(box)) == box.size, 'every pixel and channel drawn anew'
        assert np.all(image[:, ~mask] == 1.0)
        values.append(box.ravel())
    values = np.concatenate(values)
    assert abs(values.mean()) <= 4 / math.sqrt(len(values)) and abs(values.std() - 1) <= 0.02


def test_erases_in_place_and_keeps_float32():
    image = np.ones(SHAPE, dtype=np.float32)
    random.seed(0)
    result = RandomErasing(1.0, mode='pixel')(image)
    assert result is image and result.dtype == np.float32 and _erased_mask(image).any()


@pytest.mark.parametrize(('num_splits', 'untouched'), [(0, 0), (2, 2), (4, 1)])
def test_batch_leaves_the_clean_split_alone(num_splits, untouched):
    batch = np.ones((4, *SHAPE), dtype=np.float32)
    random.seed(0)
    RandomErasing(1.0, mode='const', num_splits=num_splits)(batch)
    erased = [_erased_mask(image).any() for image in batch]
    assert erased == [False] * untouched + [True] * (4 - untouched)


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'mode': 'noise'}, "mode must be one of \\['const', 'rand', 'pixel'\\], got 'noise'"),
    ({'probability': 1.5}, r'probability must lie in \[0, 1\], got 1.5'),
    ({'max_count': 0}, 'min_count <= max_count, got 1, 0'),
    ({'area_range': (0.5, 0.1)}, 'area_range'),
    ({'aspect_range': (0.0, 2.0)}, 'aspect_range'),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomErasing(**kwargs)


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match=r'CHW image or an NCHW batch, got shape \(20, 28\)'):
        RandomErasing(1.0)(np.ones((20, 28), dtype=np.float32))
