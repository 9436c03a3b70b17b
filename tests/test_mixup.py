"""mixup.py against timm's Mixup, fed the very same random draws.

How the draws are shared: timm calls numpy's legacy global functions (np.random.rand, beta, randint). The
tests route those three to a ``numpy.random.Generator`` seeded like the one our ``Mixup`` consumes, so both
sides read one identical stream. Equal outputs therefore need the same draws in the same order with the same
arguments, and after every call both generators must be in the same state (nothing extra drawn or skipped).
Any other np.random function timm might call would stay on the unseeded global stream and break equality.
"""
import numpy as np
import paddle
import pytest
import torch
from timm.data.mixup import Mixup as TimmMixup
from timm.data.mixup import mixup_target as timm_mixup_target

from config import get_config
from mixup import BatchDraws, MixParams, Mixup, build_mixup

NUM_CLASSES = 10
TOLERANCE = 1e-6

SETTINGS = {
    'mixup only': dict(mixup_alpha=0.8, cutmix_alpha=0.0),
    'cutmix only': dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    'both, switching': dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
    'both, sometimes, no smoothing': dict(mixup_alpha=0.4, cutmix_alpha=0.5, prob=0.6, switch_prob=0.3,
                                          label_smoothing=0.0),
    'cutmix, uncorrected lambda': dict(mixup_alpha=0.0, cutmix_alpha=2.0, correct_lam=False, label_smoothing=0.3),
    'cutmix minmax': dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    'mixup and cutmix minmax': dict(mixup_alpha=0.8, cutmix_alpha=0.0, cutmix_minmax=(0.3, 0.9)),
}


def _route_numpy_random_to(monkeypatch, rng):
    """Make timm's np.random.rand/beta/randint read from ``rng`` (same methods our Mixup calls)."""
    monkeypatch.setattr(np.random, 'rand', lambda *shape: rng.random(shape or None))
    monkeypatch.setattr(np.random, 'beta', lambda a, b, size=None: rng.beta(a, b, size))
    monkeypatch.setattr(np.random, 'randint', lambda low, high=None, size=None: rng.integers(low, high, size))


def _random_batch(rng, batch_size, image_shape):
    images = rng.standard_normal((batch_size, *image_shape)).astype(np.float32)
    return images, rng.integers(0, NUM_CLASSES, batch_size)


def _shipped(params: MixParams) -> list:
    """The draws as a training batch carries them."""
    return [paddle.to_tensor(part) for part in params.shipped()]


def _max_diff(ours: paddle.Tensor, theirs: torch.Tensor) -> float:
    return float(np.abs(ours.numpy() - theirs.numpy()).max())


def _compare_with_timm(monkeypatch, settings, mode, batch_size, image_shape, calls=6, seed=0):
    """Mix ``calls`` random batches with both; return our draws for coverage checks."""
    ours = Mixup(NUM_CLASSES, mode=mode, rng=np.random.default_rng(seed), **settings)
    timm_rng = np.random.default_rng(seed)
    _route_numpy_random_to(monkeypatch, timm_rng)
    theirs = TimmMixup(num_classes=NUM_CLASSES, mode=mode, **settings)
    data_rng = np.random.default_rng(seed + 1)
    draws = []
    for _ in range(calls):
        images, labels = _random_batch(data_rng, batch_size, image_shape)
        params = ours.draw(batch_size, *image_shape[1:])
        mixed, targets = ours.mix(paddle.to_tensor(images), paddle.to_tensor(labels), _shipped(params))
        ref_mixed, ref_targets = theirs(torch.tensor(images), torch.tensor(labels))
        assert _max_diff(mixed, ref_mixed) <= TOLERANCE
        assert _max_diff(targets, ref_targets) <= TOLERANCE
        assert ours.rng.bit_generator.state == timm_rng.bit_generator.state
        assert params.label_weight.dtype == (np.float64 if mode == 'batch' else np.float32)  # timm's precisions
        draws.append(params)
    return draws


@pytest.mark.parametrize('image_shape', [(3, 24, 40), (2, 40, 24)])
@pytest.mark.parametrize('batch_size', [2, 8])
@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('name', list(SETTINGS))
def test_matches_timm(monkeypatch, name, mode, batch_size, image_shape):
    settings = SETTINGS[name]
    draws = _compare_with_timm(monkeypatch, settings, mode, batch_size, image_shape)
    # The comparison must have exercised what the settings enable, and nothing else.
    boxes = np.concatenate([params.boxes for params in draws])
    pixel_weights = np.concatenate([params.pixel_weight for params in draws])
    used_cutmix = bool(np.any(boxes[:, 1] > boxes[:, 0]))
    used_mixup = bool(np.any((pixel_weights > 0) & (pixel_weights < 1)))
    assert used_cutmix == bool(settings['cutmix_alpha'] > 0 or settings.get('cutmix_minmax'))
    assert used_mixup == (settings['mixup_alpha'] > 0)


def _timm_mix_any_batch(mixer: TimmMixup, images: torch.Tensor, labels: torch.Tensor):
    """timm's Mixup.__call__ without its even-batch assert (its batch and elem paths work for odd sizes)."""
    lam = mixer._mix_elem(images) if mixer.mode == 'elem' else mixer._mix_batch(images)
    return images, timm_mixup_target(labels, mixer.num_classes, lam, mixer.label_smoothing)


def _assert_middle_unchanged(images, labels, mixed, targets, smoothing):
    """Up to rounding: Mixup of a sample with itself computes x * lam + x * (1 - lam)."""
    middle = len(labels) // 2
    np.testing.assert_allclose(mixed.numpy()[middle], images[middle], rtol=TOLERANCE, atol=0)
    expected = np.full(NUM_CLASSES, smoothing / NUM_CLASSES, dtype=np.float32)
    expected[labels[middle]] += 1 - smoothing
    np.testing.assert_allclose(targets.numpy()[middle], expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize('batch_size', [1, 3, 7])
@pytest.mark.parametrize('mode', ['batch', 'elem'])
@pytest.mark.parametrize('name', ['both, switching', 'cutmix minmax'])
def test_odd_batch_pairs_the_middle_sample_with_itself(monkeypatch, name, mode, batch_size):
    ours = Mixup(NUM_CLASSES, mode=mode, rng=np.random.default_rng(3), **SETTINGS[name])
    timm_rng = np.random.default_rng(3)
    _route_numpy_random_to(monkeypatch, timm_rng)
    theirs = TimmMixup(num_classes=NUM_CLASSES, mode=mode, **SETTINGS[name])
    data_rng = np.random.default_rng(4)
    for _ in range(4):
        images, labels = _random_batch(data_rng, batch_size, (3, 24, 40))
        mixed, targets = ours(paddle.to_tensor(images), paddle.to_tensor(labels))
        ref_mixed, ref_targets = _timm_mix_any_batch(theirs, torch.tensor(images), torch.tensor(labels))
        assert _max_diff(mixed, ref_mixed) <= TOLERANCE
        assert _max_diff(targets, ref_targets) <= TOLERANCE
        _assert_middle_unchanged(images, labels, mixed, targets, ours.label_smoothing)


@pytest.mark.parametrize('batch_size', [1, 3, 7])
@pytest.mark.parametrize('name', ['both, switching', 'cutmix minmax'])
def test_odd_pair_batch_leaves_the_middle_out(monkeypatch, name, batch_size):
    """The pairs of an odd batch are timm's pairs of the batch without its middle sample."""
    ours = Mixup(NUM_CLASSES, mode='pair', rng=np.random.default_rng(5), **SETTINGS[name])
    timm_rng = np.random.default_rng(5)
    _route_numpy_random_to(monkeypatch, timm_rng)
    theirs = TimmMixup(num_classes=NUM_CLASSES, mode='pair', **SETTINGS[name])
    data_rng = np.random.default_rng(6)
    others = np.arange(batch_size) != batch_size // 2
    for _ in range(4):
        images, labels = _random_batch(data_rng, batch_size, (3, 24, 40))
        mixed, targets = ours(paddle.to_tensor(images), paddle.to_tensor(labels))
        _assert_middle_unchanged(images, labels, mixed, targets, ours.label_smoothing)
        if batch_size > 1:
            ref_mixed, ref_targets = theirs(torch.tensor(images[others]), torch.tensor(labels[others]))
            assert _max_diff(mixed[paddle.to_tensor(others)], ref_mixed) <= TOLERANCE
            assert _max_diff(targets[paddle.to_tensor(others)], ref_targets) <= TOLERANCE
        assert ours.rng.bit_generator.state == timm_rng.bit_generator.state


def test_box_rows_come_from_height_and_columns_from_width():
    """Hand-made draws on a 24x40 image: sample 0 gets rows 2:5 and columns 10:30 of sample 1."""
    images = np.arange(2 * 3 * 24 * 40, dtype=np.float32).reshape(2, 3, 24, 40)
    params = MixParams(label_weight=np.array([0.25, 1.0], np.float32), pixel_weight=np.ones(2, np.float32),
                       boxes=np.array([[2, 5, 10, 30], [0, 0, 0, 0]]))
    mixer = Mixup(4, label_smoothing=0.2)
    mixed, targets = mixer.mix(paddle.to_tensor(images), paddle.to_tensor([1, 3]), _shipped(params))
    expected = images.copy()
    expected[0, :, 2:5, 10:30] = images[1, :, 2:5, 10:30]
    np.testing.assert_array_equal(mixed.numpy(), expected)
    # Smoothing 0.2 over 4 classes: 0.05 off, 0.85 on; sample 0 takes 1/4 of its label 1 and 3/4 of label 3.
    np.testing.assert_allclose(targets.numpy(), [[0.05, 0.25, 0.05, 0.65], [0.05, 0.05, 0.05, 0.85]],
                               rtol=0, atol=1e-7)


def test_mixup_weights_each_image_with_its_partner():
    images = np.random.default_rng(0).standard_normal((3, 2, 4, 6)).astype(np.float32)
    params = MixParams(label_weight=np.array([0.7, 0.4, 0.2], np.float32),
                       pixel_weight=np.array([0.7, 0.4, 0.2], np.float32), boxes=np.zeros((3, 4), np.int64))
    mixed, _ = Mixup(4).mix(paddle.to_tensor(images), paddle.to_tensor([0, 1, 2]), _shipped(params))
    weights = params.pixel_weight[:, None, None, None]
    np.testing.assert_allclose(mixed.numpy(), images * weights + images[::-1] * (1 - weights), rtol=0, atol=1e-6)


def test_call_is_draw_then_mix_and_leaves_inputs_alone():
    images, labels = _random_batch(np.random.default_rng(0), 4, (3, 24, 40))
    images_tensor, labels_tensor = paddle.to_tensor(images), paddle.to_tensor(labels)
    called = Mixup(NUM_CLASSES, rng=np.random.default_rng(9), cutmix_alpha=0.0)(images_tensor, labels_tensor)
    by_hand = Mixup(NUM_CLASSES, rng=np.random.default_rng(9), cutmix_alpha=0.0)
    drawn = by_hand.mix(images_tensor, labels_tensor, _shipped(by_hand.draw(4, 24, 40)))
    for ours, reference in zip(called, drawn):
        np.testing.assert_array_equal(ours.numpy(), reference.numpy())
    assert called[1].dtype == paddle.float32 and called[1].shape == [4, NUM_CLASSES]
    assert not np.array_equal(called[0].numpy(), images)
    np.testing.assert_array_equal(images_tensor.numpy(), images)


def test_build_mixup_reads_the_config():
    config = get_config()
    config.MODEL.NUM_CLASSES = 37
    config.TRAIN.MIXUP_MODE = 'elem'
    mixer = build_mixup(config, rng=np.random.default_rng(0))
    assert (mixer.num_classes, mixer.mixup_alpha, mixer.cutmix_alpha, mixer.cutmix_minmax) == (37, 0.8, 1.0, None)
    assert (mixer.prob, mixer.switch_prob, mixer.mode, mixer.label_smoothing) == (1.0, 0.5, 'elem', 0.1)
    assert mixer.correct_lam
    _, targets = mixer(paddle.zeros([2, 3, 8, 8]), paddle.to_tensor([0, 36]))
    assert targets.shape == [2, 37]


def test_build_mixup_is_off_only_when_everything_is_off():
    config = get_config()
    config.TRAIN.MIXUP_ALPHA = 0.0
    config.TRAIN.CUTMIX_ALPHA = 0.0
    assert build_mixup(config) is None
    config.TRAIN.CUTMIX_MINMAX = [0.2, 0.8]
    mixer = build_mixup(config)
    assert (mixer.cutmix_minmax, mixer.cutmix_alpha, mixer.mixup_alpha) == ((0.2, 0.8), 1.0, 0.0)


@pytest.mark.parametrize(('key', 'value', 'message'), [
    ('TRAIN.MIXUP_ALPHA', -0.5, r'mixup_alpha \(TRAIN.MIXUP_ALPHA\) must not be negative, got -0.5'),
    ('TRAIN.CUTMIX_ALPHA', -1.0, r'cutmix_alpha \(TRAIN.CUTMIX_ALPHA\) must not be negative, got -1.0'),
    ('MODEL.NUM_CLASSES', 0, r'num_classes \(MODEL.NUM_CLASSES\) must be a positive int for Mixup, got 0'),
    ('TRAIN.CUTMIX_MINMAX', [0.8, 0.2], r'TRAIN.CUTMIX_MINMAX\) must be \[min, max\] .*got \[0.8, 0.2\]'),
    ('TRAIN.CUTMIX_MINMAX', [0.2, 1.5], r'TRAIN.CUTMIX_MINMAX\) must be \[min, max\] .*got \[0.2, 1.5\]'),
])
def test_build_mixup_refuses_bad_config(key, value, message):
    config = get_config()
    section, name = key.split('.')
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        build_mixup(config)


@pytest.mark.parametrize(('settings', 'message'), [
    (dict(mode='half'), r"mode \(TRAIN.MIXUP_MODE\) must be one of \['batch', 'pair', 'elem'\], got 'half'"),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0), r'Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or a cutmix_minmax'),
    (dict(cutmix_minmax=(0.5,)), r'cutmix_minmax \(TRAIN.CUTMIX_MINMAX\) must be \[min, max\]'),
    (dict(prob=1.5), r'prob \(TRAIN.MIXUP_PROB\) must lie in \[0, 1\], got 1.5'),
    (dict(switch_prob=-0.1), r'switch_prob \(TRAIN.MIXUP_SWITCH_PROB\) must lie in \[0, 1\], got -0.1'),
    (dict(label_smoothing=2.0), r'label_smoothing \(TRAIN.SMOOTHING\) must lie in \[0, 1\], got 2.0'),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Mixup(NUM_CLASSES, **settings)


@pytest.mark.parametrize(('images', 'labels', 'error', 'message'), [
    (paddle.zeros([4, 3, 8]), paddle.to_tensor([0, 1, 2, 3]), ValueError,
     r'images must have shape \[B, C, H, W\], got \[4, 3, 8\]'),
    (paddle.zeros([4, 3, 8, 8], 'int64'), paddle.to_tensor([0, 1, 2, 3]), TypeError,
     'images must be floating point, got paddle.int64'),
    (np.zeros((4, 3, 8, 8), np.float32), paddle.to_tensor([0, 1, 2, 3]), TypeError,
     r'images must be a paddle.Tensor \[B, C, H, W\], got ndarray'),
    (paddle.zeros([0, 3, 8, 8]), paddle.to_tensor([], dtype='int64'), ValueError, 'cannot mix an empty batch'),
    (paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0, 1, 2, 10]), ValueError,
     r'Illegal index value.*received input \(10\) not less than depth \(10\)'),
    (paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0, -1, 2, 3]), ValueError,
     r'Illegal index value.*received input \(-1\) less than 0'),
    (paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([[0], [1], [2], [3]]), ValueError,
     r'labels must have shape \[4\] .*got \[4, 1\]'),
    (paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0, 1, 2]), ValueError, r'labels must have shape \[4\]'),
    (paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0.0, 1.0, 2.0, 3.0]), TypeError,
     'labels must be int32 or int64 class indices, got paddle.float32'),
])
def test_bad_batches_are_refused(images, labels, error, message):
    with pytest.raises(error, match=message):
        Mixup(NUM_CLASSES)(images, labels)


def test_draws_for_another_batch_size_are_refused():
    mixer = Mixup(NUM_CLASSES)
    with pytest.raises(ValueError, match='Mixup draws were made for 2 samples, the batch has 4'):
        mixer.mix(paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0, 1, 2, 3]), _shipped(mixer.draw(2, 8, 8)))


@pytest.mark.parametrize(('draws', 'error', 'message'), [
    ([paddle.zeros([4, 4])], TypeError, r'must be two tensors, weights \[B, 4\] and boxes \[B, 4\]'),
    ([np.zeros((4, 4), np.float32), paddle.zeros([4, 4], 'int64')], TypeError, r"got \['ndarray', 'Tensor'\]"),
    ([paddle.zeros([4, 2]), paddle.zeros([4, 4], 'int64')], ValueError,
     r'must be weights \[4, 4\] and boxes \[4, 4\], got \[4, 2\] and \[4, 4\]'),
    ([paddle.zeros([4, 4]), paddle.zeros([4, 4])], TypeError,
     'must be float weights and integer boxes, got paddle.float32 and paddle.float32'),
])
def test_malformed_draws_are_refused(draws, error, message):
    with pytest.raises(error, match=message):
        Mixup(NUM_CLASSES).mix(paddle.zeros([4, 3, 8, 8]), paddle.to_tensor([0, 1, 2, 3]), draws)


def test_batch_draws_are_the_mixups_draws_in_batch_order():
    """The loader's draws consume the Mixup's generator as drawing in the step did: the same arrays, batch after
    batch, and reseeding the Mixup reseeds them."""
    loader_side = Mixup(NUM_CLASSES, mode='elem', rng=np.random.default_rng(11))
    draws = BatchDraws(loader_side, 24, 40)
    step_side = Mixup(NUM_CLASSES, mode='elem', rng=np.random.default_rng(11))
    for batch_size in (4, 3, 4):
        for shipped, expected in zip(draws(batch_size), step_side.draw(batch_size, 24, 40).shipped()):
            np.testing.assert_array_equal(shipped, expected)
    weights, boxes = draws(4)
    assert weights.dtype == np.float32 and weights.shape == (4, 4) and boxes.dtype == np.int64
    loader_side.rng = np.random.default_rng(11)
    np.testing.assert_array_equal(draws(4)[0], Mixup(NUM_CLASSES, mode='elem', rng=np.random.default_rng(11))
                                  .draw(4, 24, 40).shipped()[0])


def test_minmax_too_narrow_for_the_image_is_refused():
    """int(5 * 0.2) == int(5 * 0.3) == 1: no box height to draw on a 5-pixel-high image."""
    mixer = Mixup(NUM_CLASSES, mixup_alpha=0.0, cutmix_minmax=(0.2, 0.3))
    with pytest.raises(ValueError, match=r'\[0.2, 0.3\] leaves no box side to draw for an image side of 5 pixels'):
        mixer(paddle.zeros([2, 3, 5, 40]), paddle.to_tensor([0, 1]))
