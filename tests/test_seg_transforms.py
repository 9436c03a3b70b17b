"""seg_transforms.py: each step of mmseg 0.11's segmentation pipeline against its rule restated here (the resize
sizes and sample positions, the ratio range, RandomCrop's cat_max_ratio retries, the flip, the photometric
distortion's ranges, order and OpenCV HSV, normalisation, padding) and the draws in mmseg's order."""
import colorsys

import numpy as np
import pytest

import seg_transforms as st

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Recorder:
    """A RandomState that records each draw as (method, args, result)."""

    def __init__(self, seed: int = 0):
        self.state = np.random.RandomState(seed)
        self.calls = []

    def __getattr__(self, name):
        method = getattr(self.state, name)

        def draw(*args):
            result = method(*args)
            self.calls.append((name, args, result))
            return result
        return draw


class Scripted:
    """Draws from fixed lists per method; fails the test when a list runs out."""

    def __init__(self, **values):
        self.values = {name: list(items) for name, items in values.items()}
        self.calls = []

    def _next(self, name, args):
        self.calls.append((name, args))
        if not self.values.get(name):
            pytest.fail(f'unexpected draw {name}{args}')
        return self.values[name].pop(0)

    def randint(self, *args):
        return self._next('randint', args)

    def uniform(self, *args):
        return self._next('uniform', args)

    def rand(self, *args):
        return self._next('rand', args)

    def random_sample(self, *args):
        return self._next('random_sample', args)


def gradient_image(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7 + y) % 256, (y * 5 + 3 * x) % 256, (x * y) % 256], axis=-1).astype(np.uint8)


# ---- resize ------------------------------------------------------------------------------------------------------

def test_rescale_size_fits_the_long_and_short_edges_and_rounds_half_up():
    assert st.rescale_size(683, 512, (2560, 640)) == (854, 640)  # factor min(2560/683, 640/512) = 1.25
    assert st.rescale_size(2000, 400, (2560, 640)) == (2560, 512)  # the long edge binds: 1.28
    assert st.rescale_size(512, 683, (640, 2560)) == (640, 854)  # (long, short) in either order
    assert st.rescale_size(3, 2, (3, 1)) == (2, 1)  # 3 * 0.5 = 1.5 rounds up (int(x + 0.5)), 2 * 0.5 = 1


def test_ratio_range_draws_scales_in_range_and_sizes_follow_the_keep_ratio_rule():
    rng = np.random.RandomState(3)
    factors = []
    for _ in range(2000):
        copy = np.random.RandomState()
        copy.set_state(rng.get_state())
        r = copy.random_sample() * 1.5 + 0.5  # mmseg: min + random_sample() * (max - min)
        scale = st.random_scale((2560, 640), (0.5, 2.0), rng)
        assert scale == (int(2560 * r), int(640 * r))
        width, height = st.rescale_size(683, 512, scale)
        factor = min(max(scale) / 683, min(scale) / 512)
        assert (width, height) == (int(683 * factor + 0.5), int(512 * factor + 0.5))
        factors.append(height / 512 / 1.25)
    assert 0.5 - 1e-2 <= min(factors) < 0.52 and 1.98 < max(factors) <= 2.0 + 1e-2


def _reference_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR restated pixel by pixel in float64: position (i + .5) * src / dst - .5, the edge
    pixel alone outside the first and last centres."""
    def taps(source, target, i):
        position = (i + 0.5) * source / target - 0.5
        first = int(np.floor(position))
        if first < 0:
            return 0, 0, 0.0
        if first >= source - 1:
            return source - 1, source - 1, 0.0
        return first, first + 1, position - first
    out = np.zeros((height, width, image.shape[2]))
    for y in range(height):
        y0, y1, fy = taps(image.shape[0], height, y)
        for x in range(width):
            x0, x1, fx = taps(image.shape[1], width, x)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize('size', [(23, 17), (9, 5), (40, 31), (10, 13)])
def test_bilinear_resize_samples_where_opencv_does(size):
    image = gradient_image(13, 10).astype(np.float64)
    resized = st.resize_bilinear(image.astype(np.uint8), *size)
    reference = _reference_linear(image, *size)
    assert resized.shape == (size[1], size[0], 3) and resized.dtype == np.uint8
    assert np.abs(resized - reference).max() <= 0.5 + 1e-3  # rounding only


def test_bilinear_halving_averages_two_by_two_blocks_and_same_size_is_identity():
    image = gradient_image(8, 12)
    blocks = image.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(st.resize_bilinear(image, 6, 4), np.floor(blocks + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(st.resize_bilinear(image, 12, 8), image)


def test_nearest_resize_takes_floor_of_position_times_ratio():
    label = np.arange(5, dtype=np.uint8)[None].repeat(2, axis=0)
    np.testing.assert_array_equal(st.resize_nearest(label, 3, 2)[0], [0, 1, 3])  # floor(i * 5 / 3)
    np.testing.assert_array_equal(st.resize_nearest(label[:, :3], 5, 2)[0], [0, 0, 1, 1, 2])  # floor(i * 3 / 5)
    assert st.resize_nearest(label, 5, 7).shape == (7, 5)


def test_rescale_gives_image_and_label_the_same_keep_ratio_size():
    image, label = gradient_image(30, 40), np.zeros((30, 40), np.uint8)
    resized, resized_label = st.rescale(image, label, (100, 45))  # factor min(100/40, 45/30) = 1.5
    assert resized.shape == (45, 60, 3) and resized_label.shape == (45, 60)


# ---- RandomCrop ---------------------------------------------------------------------------------------------------

def _two_class_label() -> np.ndarray:
    """10x10: columns 0-5 class 1, columns 6-9 class 2 (so a 4x4 crop at left 0-2 holds class 1 only)."""
    label = np.ones((10, 10), np.uint8)
    label[:, 6:] = 2
    return label


def test_crop_rule_needs_two_classes_and_the_largest_under_the_ratio_of_non_ignored_pixels():
    assert not st.crop_is_balanced(np.ones((4, 4), np.uint8), 0.75, 255)  # one class
    assert not st.crop_is_balanced(np.full((4, 4), 255, np.uint8), 0.75, 255)  # nothing but ignored pixels
    only_one = np.full((4, 4), 255, np.uint8)
    only_one[0] = 3
    assert not st.crop_is_balanced(only_one, 0.75, 255)  # one class besides ignored pixels
    three_quarters = np.ones((4, 4), np.uint8)
    three_quarters[0] = 2
    assert not st.crop_is_balanced(three_quarters, 0.75, 255)  # 12/16 is not < 0.75
    ignored = np.full((4, 4), 255, np.uint8)
    ignored[:2, :3], ignored[:2, 3] = 1, 2  # 6 vs 2 non-ignored: 0.75 of them, although 6/16 of the crop
    assert not st.crop_is_balanced(ignored, 0.75, 255)
    ignored[:2, 2] = 2  # 4 vs 4
    assert st.crop_is_balanced(ignored, 0.75, 255)


def test_crop_retries_until_a_box_passes():
    # (top, left) per box: three boxes of class 1 only, then one across the border
    rng = Scripted(randint=[0, 0, 3, 1, 6, 2, 2, 4])
    assert st.random_crop_box(_two_class_label(), (4, 4), 0.75, 255, rng) == (2, 6, 4, 8)
    assert rng.calls == [('randint', (0, 7))] * 8  # margins 10 - 4 + 1


def test_after_ten_failures_the_eleventh_box_is_used_unchecked():
    failing = [0, 0] * 10  # ten boxes of class 1 only
    rng = Scripted(randint=[*failing, 5, 1])  # the eleventh: class 1 only too, used all the same
    assert st.random_crop_box(_two_class_label(), (4, 4), 0.75, 255, rng) == (5, 9, 1, 5)
    assert len(rng.calls) == 22


def test_without_cat_max_ratio_one_box_and_small_sides_stay_whole():
    label = _two_class_label()
    rng = Scripted(randint=[1, 2])
    assert st.random_crop_box(label, (4, 4), 1.0, 255, rng) == (1, 5, 2, 6)
    rng = Scripted(randint=[0, 4])
    top, bottom, left, right = st.random_crop_box(label[:3], (4, 4), 0.75, 255, rng)  # 3 rows: margin 0
    assert label[:3][top:bottom, left:right].shape == (3, 4) and (top, left) == (0, 4)
    assert rng.calls == [('randint', (0, 1)), ('randint', (0, 7))]


def test_resizing_only_the_crop_box_equals_resizing_all_then_cropping():
    image = gradient_image(37, 53)
    whole = st.resize_bilinear(image, 91, 64)
    for box in ((0, 64, 0, 91), (5, 30, 17, 60), (40, 80, 70, 110)):  # the last runs past the edges
        np.testing.assert_array_equal(st.resize_bilinear(image, 91, 64, box), whole[box[0]:box[1], box[2]:box[3]])


# ---- flip, normalise, pad -------------------------------------------------------------------------------------------

def test_flip_moves_image_and_label_together_when_rand_is_below_prob():
    image, label = gradient_image(3, 5), np.arange(15, dtype=np.uint8).reshape(3, 5)
    flipped, flipped_label = st.random_flip(image, label, 0.5, Scripted(rand=[0.49]))
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    same, same_label = st.random_flip(image, label, 0.5, Scripted(rand=[0.5]))
    assert same is image and same_label is label


def test_normalise_is_imagenet_mean_and_std_in_255_units_as_chw():
    image = gradient_image(4, 6)
    expected = (image.astype(np.float64) - 255 * np.array(MEAN)) / (255 * np.array(STD))
    out = st.normalise(image, MEAN, STD)
    assert out.dtype == np.float32 and out.shape == (3, 4, 6) and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=0, atol=2e-6)


def test_pad_fills_bottom_and_right_with_zero_and_the_ignore_index():
    image, label = np.ones((3, 2, 3), np.float32), np.zeros((2, 3), np.uint8)
    padded, padded_label = st.pad_to(image, label, (4, 5), 255)
    assert padded.shape == (3, 4, 5) and padded_label.shape == (4, 5)
    assert (padded[:, :2, :3] == 1).all() and (padded[:, 2:] == 0).all() and (padded[:, :, 3:] == 0).all()
    assert (padded_label[:2, :3] == 0).all() and (padded_label[2:] == 255).all() and (padded_label[:, 3:] == 255).all()


# ---- HSV and the photometric distortion ------------------------------------------------------------------------------

def all_colours(step: int = 7) -> np.ndarray:
    values = np.arange(0, 256, step)
    return np.stack(np.meshgrid(values, values, values), axis=-1).reshape(1, -1, 3).astype(np.uint8)


def test_rgb_to_hsv_is_opencvs_8bit_hsv():
    colours = all_colours()
    hsv = st.rgb_to_hsv(colours)[0].astype(np.float64)
    reference = np.array([colorsys.rgb_to_hsv(*(c / 255)) for c in colours[0].astype(np.float64)])
    np.testing.assert_array_equal(hsv[:, 2], reference[:, 2] * 255)  # V = max
    assert np.abs(hsv[:, 1] - reference[:, 1] * 255).max() <= 0.5 + 1e-3  # S = 255 (max - min) / max, rounded
    hue_error = np.abs(hsv[:, 0] - reference[:, 0] * 180)
    assert np.minimum(hue_error, 180 - hue_error).max() <= 0.5 + 0.2  # degrees / 2, rounded (tables of 2^-12)
    assert hsv[:, 0].max() < 180
    primaries = np.array([[[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255],
                           [90, 90, 90]]], np.uint8)
    np.testing.assert_array_equal(st.rgb_to_hsv(primaries)[0], [[0, 255, 255], [30, 255, 255], [60, 255, 255],
                                                               [90, 255, 255], [120, 255, 255], [150, 255, 255],
                                                               [0, 0, 90]])


def test_hsv_to_rgb_is_the_sector_formula_rounded():
    values = np.arange(0, 256, 5)
    hues = np.arange(0, 180, 3)
    grid = np.stack(np.meshgrid(hues, values, values), axis=-1).reshape(1, -1, 3).astype(np.uint8)
    rgb = st.hsv_to_rgb(grid)[0].astype(np.float64)
    reference = np.array([colorsys.hsv_to_rgb(h / 180, s / 255, v / 255) for h, s, v in grid[0].astype(np.float64)])
    assert np.abs(rgb - reference * 255).max() <= 0.5 + 1e-3
    colours = all_colours(3)
    round_trip = st.hsv_to_rgb(st.rgb_to_hsv(colours)).astype(int) - colours
    assert np.abs(round_trip).max() <= 5  # H is kept in 2-degree steps


def test_distortion_draws_each_step_with_probability_one_half_from_mmsegs_ranges():
    distortion = st.PhotoMetricDistortion()
    image = gradient_image(6, 7)
    brightness, factors, hues = [], [], []
    for seed in range(400):
        rng = Recorder(seed)
        distortion(image, rng)
        gates = [result for name, args, result in rng.calls if (name, args) == ('randint', (2,))]
        assert len(gates) == 5  # four steps and, second, the mode
        assert len(rng.calls) - 5 == sum(gates[:1] + gates[2:])  # one draw for each step whose gate opened
        brightness += [result for name, args, result in rng.calls if (name, args) == ('uniform', (-32, 32))]
        factors += [result for name, args, result in rng.calls if (name, args) == ('uniform', (0.5, 1.5))]
        hues += [result for name, args, result in rng.calls if (name, args) == ('randint', (-18, 18))]
    assert 140 < len(brightness) < 260 and 140 < len(hues) < 260 and 280 < len(factors) < 520
    assert min(brightness) >= -32 and max(brightness) <= 32
    assert min(factors) >= 0.5 and max(factors) <= 1.5
    assert min(hues) == -18 and max(hues) == 17  # numpy's randint excludes the upper bound


@pytest.mark.parametrize('mode', [0, 1])
def test_distortion_order_follows_the_mode(mode):
    """Every step on: brightness +10.7, then contrast x1.4 first (mode 1) or last (mode 0), saturation x0.6,
    hue -18, each on uint8 with float32 arithmetic, clipping and truncation."""
    distortion = st.PhotoMetricDistortion()
    image = gradient_image(9, 11)
    uniforms = [10.7, 1.4, 0.6] if mode == 1 else [10.7, 0.6, 1.4]
    rng = Scripted(randint=[1, mode, *([1] if mode == 1 else []), 1, 1, -18, *([1] if mode == 0 else [])],
                   uniform=uniforms)
    out = distortion(image, rng)

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def saturation(x):
        hsv = st.rgb_to_hsv(x)
        hsv[..., 1] = convert(hsv[..., 1], 0.6)
        return st.hsv_to_rgb(hsv)

    def hue(x):
        hsv = st.rgb_to_hsv(x)
        hsv[..., 0] = (hsv[..., 0].astype(int) - 18) % 180
        return st.hsv_to_rgb(hsv)

    bright = convert(image, beta=10.7)
    expected = hue(saturation(convert(bright, 1.4))) if mode == 1 else convert(hue(saturation(bright)), 1.4)
    other = convert(hue(saturation(bright)), 1.4) if mode == 1 else hue(saturation(convert(bright, 1.4)))
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(expected, other)  # the order matters on this image
    assert [args for name, args in rng.calls if name == 'uniform'] == (
        [(-32, 32), (0.5, 1.5), (0.5, 1.5)])


def test_brightness_and_contrast_clip_then_truncate():
    pixels = np.array([[[250, 100, 5]]], np.uint8)
    np.testing.assert_array_equal(st.PhotoMetricDistortion.convert(pixels, beta=10.7), [[[255, 110, 15]]])
    np.testing.assert_array_equal(st.PhotoMetricDistortion.convert(pixels, beta=-10.7), [[[239, 89, 0]]])
    np.testing.assert_array_equal(st.PhotoMetricDistortion.convert(pixels, alpha=1.5), [[[255, 150, 7]]])


def test_hue_wraps_modulo_180():
    distortion = st.PhotoMetricDistortion()
    image = st.hsv_to_rgb(np.array([[[175, 255, 255]]], np.uint8))
    out = distortion.hue(image, Scripted(randint=[1, 17]))
    assert st.rgb_to_hsv(out)[0, 0, 0] == (st.rgb_to_hsv(image)[0, 0, 0] + 17) % 180


# ---- the pipelines ---------------------------------------------------------------------------------------------------

def train_transform(crop: int = 64, img_scale=(256, 64)) -> st.SegTrainTransform:
    return st.SegTrainTransform(crop_size=crop, img_scale=img_scale, ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                                flip_prob=0.5, distortion=st.PhotoMetricDistortion(), mean=MEAN, std=STD,
                                ignore_index=255)


def test_train_pipeline_draws_in_mmsegs_order():
    image, label = gradient_image(48, 60), (np.arange(48 * 60) % 7).reshape(48, 60).astype(np.uint8)
    rng = Recorder(5)
    train_transform()(image, label, rng)
    names = [(name, args) for name, args, _ in rng.calls]
    assert names[0] == ('random_sample', ())
    assert names[1][0] == 'randint' and names[2][0] == 'randint'  # crop top, left (the first box passes here)
    assert names[3] == ('rand', ())  # flip
    assert names[4] == ('randint', (2,))  # brightness gate, then the distortion's draws


def test_train_pipeline_is_the_steps_in_mmsegs_order():
    """Resize all, crop, flip, distort, normalise, pad, composed from the steps on a copy of the generator."""
    image, label = gradient_image(50, 70), ((np.arange(50 * 70) // 9) % 6).reshape(50, 70).astype(np.uint8)
    label[:10] = 255
    transform = train_transform(crop=64, img_scale=(256, 64))
    for seed in range(6):
        out, out_label = transform(image, label, np.random.RandomState(seed))
        rng = np.random.RandomState(seed)
        resized, resized_label = st.rescale(image, label, st.random_scale((256, 64), (0.5, 2.0), rng))
        y1, y2, x1, x2 = st.random_crop_box(resized_label, (64, 64), 0.75, 255, rng)
        steps = st.random_flip(resized[y1:y2, x1:x2], resized_label[y1:y2, x1:x2], 0.5, rng)
        distorted = st.PhotoMetricDistortion()(np.ascontiguousarray(steps[0]), rng)
        expected, expected_label = st.pad_to(st.normalise(distorted, MEAN, STD), steps[1], (64, 64), 255)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out_label, expected_label)


def test_train_pipeline_shapes_padding_and_seed():
    image, label = gradient_image(40, 50), (np.arange(40 * 50) % 5).reshape(40, 50).astype(np.uint8)
    transform = train_transform(crop=128, img_scale=(256, 64))  # at most 128 px tall: padded below
    out, out_label = transform(image, label, np.random.RandomState(1))
    assert out.shape == (3, 128, 128) and out.dtype == np.float32
    assert out_label.shape == (128, 128) and out_label.dtype == np.int64
    again, again_label = transform(image, label, np.random.RandomState(1))
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(out_label, again_label)
    rows = np.flatnonzero((out_label != 255).any(axis=1))
    assert rows.max() < 127 and (out[:, rows.max() + 1:] == 0).all() and (out_label[rows.max() + 1:] == 255).all()


def test_eval_pipeline_resizes_to_the_scale_and_keeps_the_original_label():
    image, label = gradient_image(30, 45), np.full((30, 45), 3, np.uint8)
    out, out_label = st.SegEvalTransform(img_scale=(2560, 640), mean=MEAN, std=STD)(image, label)
    assert out.shape == (3, 640, 960) and out.dtype == np.float32  # factor min(2560/45, 640/30)
    assert out_label.dtype == np.int64 and out_label.shape == (30, 45)
