"""random_erasing.py against timm 1.0.31's RandomErasing: boxes seed for seed, area and probability
statistics, fill values per mode, batch splits and errors; the boxes drawn on the host (the loader worker) and
applied on the device, and the counter-based noise against a numpy reference of its documented law."""
import math
import random

import numpy as np
import paddle
import pytest
import torch
from scipy import special, stats
from timm.data.random_erasing import RandomErasing as TimmRandomErasing

from config import RANDOM_ERASE_MODES as MODES
from random_erasing import BOX_FIELDS, UNIFORM_BITS, RandomErasing, normal_from_bits, standard_normal

SHAPE = (3, 20, 28)


def _erased_mask(image) -> np.ndarray:
    """Pixels changed from the all-ones input (normal fills never land exactly on 1.0)."""
    return (np.asarray(image) != 1.0).any(axis=0)


def _erase(eraser: RandomErasing, images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``eraser.apply`` of [N, count, 5] boxes to float NCHW images, through Paddle tensors."""
    return eraser.apply(paddle.to_tensor(images), paddle.to_tensor(boxes)).numpy()


def _ours(seed: int, eraser: RandomErasing, shape=SHAPE) -> np.ndarray:
    """One all-ones image erased: boxes drawn as a loader worker draws them (seeded per sample), then applied."""
    random.seed(seed)
    np.random.seed(seed)
    boxes = eraser.draw(*shape[1:])
    return _erase(eraser, np.ones((1, *shape), dtype=np.float32), boxes[None])[0]


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
        # drawn anew per pixel and channel (24-bit uniforms: a rare repeat, as with any float32 generator)
        assert len(np.unique(box)) >= 0.99 * box.size
        assert np.all(image[:, ~mask] == 1.0)
        values.append(box.ravel())
    values = np.concatenate(values)
    assert abs(values.mean()) <= 4 / math.sqrt(len(values)) and abs(values.std() - 1) <= 0.02


def test_draw_gives_integer_rows_and_zero_rows_for_no_box():
    """int64 [max_count, 5]; an image not picked (probability 0) gets zeros, which erase nothing."""
    random.seed(0)
    np.random.seed(0)
    boxes = RandomErasing(1.0, mode='pixel', min_count=3, max_count=3).draw(*SHAPE[1:])
    assert boxes.dtype == np.int64 and boxes.shape == (3, len(BOX_FIELDS))
    assert (boxes[:, 2] > 0).all() and (boxes[:, 4] > 0).all()
    never = RandomErasing(0.0, mode='pixel', max_count=2)
    assert not never.draw(*SHAPE[1:]).any() and never.boxes_nbytes == 2 * 5 * 8
    images = np.ones((1, *SHAPE), dtype=np.float32)
    assert np.array_equal(_erase(never, images, never.draw(*SHAPE[1:])[None]), images)


def test_applied_boxes_keep_dtype_shape_and_the_rest_of_the_image():
    eraser = RandomErasing(1.0, mode='pixel')
    images = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    boxes = np.array([[[2, 3, 5, 7, 11]], [[0, 0, 0, 0, 0]]], dtype=np.int64)
    result = _erase(eraser, images, boxes)
    assert result.dtype == np.float32 and result.shape == images.shape
    changed = (result != images).any(axis=1)
    assert changed[0, 2:7, 3:10].all() and changed[0].sum() == 35 and not changed[1].any()


@pytest.mark.parametrize(('num_splits', 'untouched'), [(0, 0), (2, 2), (4, 1)])
def test_batch_leaves_the_clean_split_alone(num_splits, untouched):
    """As timm's prefetching loader: the first batch_size // num_splits images stay clean."""
    eraser = RandomErasing(1.0, mode='const', num_splits=num_splits)
    random.seed(0)
    boxes = np.stack([eraser.draw(*SHAPE[1:]) for _ in range(4)])
    batch = _erase(eraser, np.ones((4, *SHAPE), dtype=np.float32), boxes)
    erased = [_erased_mask(image).any() for image in batch]
    assert erased == [False] * untouched + [True] * (4 - untouched)


def _mix32(x: np.ndarray) -> np.ndarray:
    """The mixer random_erasing.hash32 documents, on uint64 arrays holding 32-bit values."""
    mask = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x2C1B3C6D)) & mask
    x = x ^ (x >> np.uint64(12))
    x = (x * np.uint64(0x297A2D39)) & mask
    return x ^ (x >> np.uint64(15))


def test_noise_follows_its_documented_law():
    """standard_normal(seed, counter) = sqrt(2) erfinv(2u - 1), u from the top 23 bits of
    mix32(mix32(seed) ^ counter): a float64 numpy reference agrees to float32 erfinv's accuracy (1e-4
    relative, reached in the far tails), so the noise is the same function on any device."""
    seeds = np.array([[0], [1], [12345], [2 ** 31 - 1]], dtype=np.int64)
    counters = np.arange(4096, dtype=np.int64)[None]
    bits = _mix32(_mix32(seeds.astype(np.uint64)) ^ counters.astype(np.uint64)) >> np.uint64(9)
    expected = math.sqrt(2) * special.erfinv(2 * ((bits.astype(np.float64) + 0.5) / 2 ** 23) - 1)
    ours = standard_normal(paddle.to_tensor(seeds), paddle.to_tensor(counters)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (4, 4096)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


def test_every_hash_gives_a_finite_noise_value():
    """All 2^23 bit patterns, the extremes included: a u that rounds to 1.0 would make erfinv inf (and the
    erased pixels and the loss nan, as 24 bits did in the demo at epoch 5)."""
    values = normal_from_bits(paddle.arange(2 ** UNIFORM_BITS, dtype='int64')).numpy()
    assert np.isfinite(values).all()
    assert values.min() == -values.max() and 5.2 < values.max() < 5.3


def test_noise_is_standard_normal_and_uncorrelated():
    """200,000 values of 50 seeds: a KS test against N(0, 1) (p > 0.001), mean and std within 4 standard errors,
    neighbouring counters and neighbouring seeds uncorrelated (|r| < 4 / sqrt(n))."""
    seeds = paddle.arange(50, dtype='int64').reshape([50, 1]) * 7919 + 3
    values = standard_normal(seeds, paddle.arange(4000, dtype='int64').reshape([1, 4000])).numpy()
    flat = values.ravel()
    assert stats.kstest(flat, 'norm').pvalue > 1e-3
    assert abs(flat.mean()) < 4 / math.sqrt(flat.size) and abs(flat.std() - 1) < 4 * math.sqrt(0.5 / flat.size)
    limit = 4 / math.sqrt(values[:, 1:].size)
    assert abs(np.corrcoef(values[:, :-1].ravel(), values[:, 1:].ravel())[0, 1]) < limit
    assert abs(np.corrcoef(values[:-1].ravel(), values[1:].ravel())[0, 1]) < limit


def test_an_images_erasing_depends_on_its_boxes_alone():
    """The same boxes give the same erased image whichever batch, position or call it is in (so neither the
    loader's worker count nor the batch composition matters); another seed gives other noise."""
    eraser = RandomErasing(1.0, mode='pixel', max_count=2)
    random.seed(3)
    np.random.seed(3)
    boxes = np.stack([eraser.draw(*SHAPE[1:]) for _ in range(4)])
    images = np.random.default_rng(1).standard_normal((4, *SHAPE)).astype(np.float32)
    batch = _erase(eraser, images, boxes)
    for index in range(4):
        alone = _erase(eraser, images[index:index + 1], boxes[index:index + 1])[0]
        assert np.array_equal(alone, batch[index])
    np.testing.assert_array_equal(_erase(eraser, images[::-1].copy(), boxes[::-1].copy()), batch[::-1])
    reseeded = boxes.copy()
    reseeded[:, :, 4] += 1
    changed = (_erase(eraser, images, reseeded) != batch).any(axis=1)
    assert np.array_equal(changed, (batch != images).any(axis=1))


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


def test_bad_shapes_are_rejected():
    eraser = RandomErasing(1.0)
    boxes = np.zeros((2, 1, 5), dtype=np.int64)
    with pytest.raises(ValueError, match=r'NCHW images and \[N, count, 5\] boxes, got shapes \[2, 20, 28\]'):
        _erase(eraser, np.ones((2, 20, 28), dtype=np.float32), boxes)
    with pytest.raises(ValueError, match=r'got shapes \[3, 3, 20, 28\] and \[2, 1, 5\]'):
        _erase(eraser, np.ones((3, *SHAPE), dtype=np.float32), boxes)
