"""seg_inference against mmseg 0.11's definitions restated here: the sliding-window grid and counts, sliding equal
to whole-image inference for pointwise stand-ins (exactly, borders and corners included), multi-scale + flip equal
to a numpy restatement, the scale rules of mmseg's Resize and unilm's SETR_Resize, and the config checks."""
from dataclasses import replace

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import torch

import seg_inference as si
from beit import build_beit
from config import ConfigError, get_default_config, merge_opts
from helpers import tiny_config

ADE = {'crop_size': (640, 640), 'stride': (426, 426), 'img_scale': (2560, 640)}
RNG_SEED = 22


def settings(**changes) -> si.InferenceSettings:
    return si.InferenceSettings(**{**ADE, **changes})


def pointwise_weights(num_classes: int = 5) -> paddle.Tensor:
    """Small integers: every sum the convolution makes is exact in float32, whatever order a kernel adds in."""
    return paddle.to_tensor(np.random.default_rng(RNG_SEED).integers(-2, 3, (num_classes, 3, 1, 1)), 'float32')


class Pointwise:
    """A 1x1 conv stand-in (each pixel's logits from that pixel alone) that records its input shapes; ``upsample``
    repeats each logit over upsample x upsample pixels (logits larger than the input)."""

    def __init__(self, upsample: int = 1):
        self.weight = pointwise_weights()
        self.upsample = upsample
        self.shapes = []

    def __call__(self, images: paddle.Tensor) -> paddle.Tensor:
        self.shapes.append(tuple(images.shape))
        logits = F.conv2d(images, self.weight)
        if self.upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.upsample, mode='nearest')
        return logits


def random_images(height: int, width: int, num: int = 1) -> paddle.Tensor:
    """Small integers (see pointwise_weights): exact comparisons stay exact on every CPU and thread count."""
    rng = np.random.default_rng(height * 10007 + width)
    return paddle.to_tensor(rng.integers(-3, 4, (num, 3, height, width)), 'float32')


def restated_spans(size: int, crop: int, stride: int) -> list:
    """mmseg's slide loop along one side, written out."""
    spans = []
    for index in range(max(size - crop + stride - 1, 0) // stride + 1):
        start = index * stride
        end = min(start + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


@pytest.mark.parametrize(('size', 'expected'), [
    (700, [(0, 640), (60, 700)]), (1000, [(0, 640), (360, 1000)]), (641, [(0, 640), (1, 641)]),
    (640, [(0, 640)]), (300, [(0, 300)]), (1500, [(0, 640), (426, 1066), (852, 1492), (860, 1500)])])
def test_window_spans_follow_mmseg_grid(size, expected):
    assert si.window_spans(size, 640, 426) == expected == restated_spans(size, 640, 426)


def test_window_counts_are_1_2_4_at_corners_edges_and_centre():
    counts = si.window_counts(641, 641, settings())
    for corner in ((0, 0), (0, 640), (640, 0), (640, 640)):
        assert counts[corner] == 1
    assert counts[0, 1] == counts[0, 639] == counts[1, 0] == counts[640, 320] == 2
    assert (counts[1:640, 1:640] == 4).all()
    expected = np.zeros((641, 641))
    for top, bottom in restated_spans(641, 640, 426):
        for left, right in restated_spans(641, 640, 426):
            expected[top:bottom, left:right] += 1
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize(('height', 'width'), [(700, 1000), (641, 641), (300, 500), (640, 640)])
@pytest.mark.parametrize('upsample', [1, 4])
def test_sliding_equals_whole_for_a_pointwise_model(height, width, upsample):
    images = random_images(height, width, num=2)
    model = Pointwise(upsample)
    sliding = si.slide_logits(model, images, settings()).numpy()
    whole = si.view_logits(Pointwise(upsample), images, settings(mode='whole')).numpy()
    direct = F.conv2d(images, pointwise_weights()).numpy()
    np.testing.assert_array_equal(whole, direct)
    np.testing.assert_array_equal(sliding, direct)  # exact everywhere: borders and corners included
    for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_array_equal(sliding[(..., *corner)], direct[(..., *corner)])


def test_windows_per_forward_changes_calls_not_results():
    images = random_images(700, 1500)
    results = {}
    for per_call in (1, 2, 3, 8):
        model = Pointwise()
        results[per_call] = si.slide_logits(model, images, settings(windows_per_forward=per_call)).numpy()
        assert len(model.shapes) == -(-8 // per_call)  # 2 x 4 windows
        assert all(shape[0] == min(per_call, 8 - call * per_call) for call, shape in enumerate(model.shapes))
    for result in results.values():
        np.testing.assert_array_equal(result, results[1])


def test_windows_of_a_small_image_are_padded_to_the_crop_with_zeros():
    images = random_images(300, 700)
    seen = []

    def model(crops):
        seen.append(crops.numpy())
        return F.conv2d(crops, pointwise_weights())

    logits = si.slide_logits(model, images, settings()).numpy()
    assert [crop.shape for crop in seen] == [(2, 3, 640, 640)]  # the two windows (0-640, 60-700), one call
    np.testing.assert_array_equal(seen[0][0, :, :300], images.numpy()[0, :, :, :640])
    np.testing.assert_array_equal(seen[0][1, :, :300], images.numpy()[0, :, :, 60:])
    assert not seen[0][:, :, 300:].any()
    np.testing.assert_array_equal(logits, F.conv2d(images, pointwise_weights()).numpy())
    unpadded = Pointwise()
    si.slide_logits(unpadded, images, settings(pad_to_crop=False))
    assert unpadded.shapes == [(2, 3, 300, 640)]  # mmseg's behaviour: the small window as it is


def np_resize(values: np.ndarray, size) -> np.ndarray:
    """Bilinear resize with align_corners False restated: source coordinate (i + 0.5) * in / out - 0.5, clamped at
    0, interpolated between floor and floor + 1 (the last index repeated)."""
    def weights(n_in, n_out):
        source = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(int), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.arange(n_out), low), 1 - (source - low))
        np.add.at(matrix, (np.arange(n_out), high), source - low)
        return matrix
    return weights(values.shape[2], size[0]) @ values @ weights(values.shape[3], size[1]).T


def test_numpy_resize_is_torch_bilinear_without_aligned_corners():
    values = np.random.default_rng(1).standard_normal((1, 2, 13, 17))
    for size in ((52, 68), (5, 7), (13, 30), (16, 22)):
        expected = torch.nn.functional.interpolate(torch.from_numpy(values), size=size, mode='bilinear',
                                                   align_corners=False).numpy()
        np.testing.assert_allclose(np_resize(values, size), expected, atol=1e-12)


WEIGHT = np.random.default_rng(5).standard_normal((4, 3))


def paddle_model(images: paddle.Tensor, pool: int = 2) -> paddle.Tensor:
    """A stand-in at 1/pool resolution: tanh of a 1x1 conv, average-pooled, plus a left-to-right ramp (so that a
    mirrored view differs)."""
    logits = paddle.tanh(F.conv2d(images, paddle.to_tensor(WEIGHT[:, :, None, None], 'float32')))
    pooled = F.avg_pool2d(logits, pool)
    return pooled + paddle.linspace(0, 1, pooled.shape[3]).reshape([1, 1, 1, -1])


def numpy_model(images: np.ndarray, pool: int = 2) -> np.ndarray:
    logits = np.tanh(np.einsum('kc,nchw->nkhw', WEIGHT, images))
    n, k, h, w = logits.shape
    pooled = logits[:, :, :h // pool * pool, :w // pool * pool].reshape(n, k, h // pool, pool, w // pool, pool)
    pooled = pooled.mean(axis=(3, 5))
    return pooled + np.linspace(0, 1, pooled.shape[3])[None, None, None]


def numpy_probs(image: np.ndarray, shapes, crop: int, stride: int, flip: bool, pool: int = 2) -> np.ndarray:
    """mmseg 0.11's aug_test restated: per scale (and mirror) the sliding logits, resized to the original size,
    softmaxed, mirrored back; the mean of those."""
    outputs = []
    for shape in shapes:
        for mirrored in ((False, True) if flip else (False,)):
            view = np_resize(image, shape)
            view = view[..., ::-1] if mirrored else view
            total = np.zeros((1, WEIGHT.shape[0], *shape))
            counts = np.zeros(shape)
            for top, bottom in restated_spans(shape[0], crop, stride):
                for left, right in restated_spans(shape[1], crop, stride):
                    window = view[:, :, top:bottom, left:right]
                    total[:, :, top:bottom, left:right] += np_resize(numpy_model(window, pool), window.shape[2:])
                    counts[top:bottom, left:right] += 1
            logits = np_resize(total / counts, image.shape[2:])
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            outputs.append(probs[..., ::-1] if mirrored else probs)
    return np.mean(outputs, axis=0)


def test_multi_scale_flip_equals_numpy_restatement():
    image = np.random.default_rng(7).standard_normal((1, 3, 20, 27))
    small = si.InferenceSettings(crop_size=(16, 16), stride=(11, 11), img_scale=(64, 16), ratios=(0.5, 1.0, 1.5),
                                 flip=True)
    shapes = si.view_shapes(20, 27, small)
    assert shapes == [(16, 22), (16, 22), (24, 32)]  # SETR_Resize: short side max(16, 8 / 16 / 24)
    views = []

    def view(shape):
        views.append(shape)
        return np_resize(image, shape).astype(np.float32)

    probs = si.segment_probs(paddle_model, view, (20, 27), small).numpy()
    assert views == [(16, 22), (24, 32)]  # each size resized once, its mirror made from it
    expected = numpy_probs(image.astype(np.float32).astype(np.float64), shapes, 16, 11, flip=True)
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    labels = si.segment(paddle_model, view, (20, 27), small).numpy()
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-4
    np.testing.assert_array_equal(labels[decided], expected.argmax(axis=1)[decided])
    unflipped = si.segment_probs(paddle_model, view, (20, 27), replace(small, flip=False))
    assert np.abs(unflipped.numpy() - probs).max() > 1e-3  # the ramp: flipping changes this model's output


def test_ade_sized_image_at_one_scale_equals_numpy_restatement():
    """unilm's single-scale test at its real sizes: 512 x 683 resized to 640 x 854, two 640 windows at stride
    426, a model with logits at 1/4 resolution."""
    image = np.random.default_rng(8).standard_normal((1, 3, 512, 683)).astype(np.float32)
    shapes = si.view_shapes(512, 683, settings())
    assert shapes == [(640, 854)]
    probs = si.segment_probs(lambda x: paddle_model(x, pool=4), lambda shape: np_resize(image, shape).astype(
        np.float32), (512, 683), settings()).numpy()
    expected = numpy_probs(image.astype(np.float64), shapes, 640, 426, flip=False, pool=4)
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # float32 bilinear coordinates at 854 px: ~4e-6 seen


def symmetric_conv(images: paddle.Tensor) -> paddle.Tensor:
    """A flip-equivariant stand-in: a 3x3 conv whose kernels are mirror-symmetric left to right."""
    kernel = np.random.default_rng(3).standard_normal((4, 3, 3, 3))
    kernel = kernel + kernel[..., ::-1]
    return F.conv2d(images, paddle.to_tensor(kernel, 'float32'), padding=1)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_a_flip_equivariant_model_gives_the_same_map_with_and_without_flip(mode):
    image = random_images(24, 38)
    small = dict(crop_size=(24, 24), stride=(14, 14), img_scale=(96, 24), mode=mode)  # windows 0-24, 14-38
    with_flip = si.segment_probs(symmetric_conv, lambda shape: image, (24, 38),
                                 si.InferenceSettings(**small, flip=True)).numpy()
    without = si.segment_probs(symmetric_conv, lambda shape: image, (24, 38), si.InferenceSettings(**small)).numpy()
    np.testing.assert_allclose(with_flip, without, atol=1e-6)
    np.testing.assert_array_equal(with_flip.argmax(axis=1), without.argmax(axis=1))


@pytest.mark.parametrize(('height', 'width', 'ratios', 'setr', 'expected'), [
    (512, 683, (), True, [(640, 854)]),  # one scale: mmseg's Resize to (2560, 640)
    (683, 512, (), True, [(854, 640)]),
    (200, 1000, (), True, [(512, 2560)]),  # ratio 5: the long side caps it, short side under the crop
    (512, 683, (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True,
     [(640, 854), (640, 854), (640, 854), (800, 1067), (960, 1281), (1120, 1494)]),
    (200, 1000, (1.0,), True, [(640, 3200)]),  # SETR_Resize: no long-side cap
    (512, 683, (0.5, 1.0, 1.75), False, [(320, 427), (640, 854), (1120, 1494)]),  # mmseg's Resize per ratio
])
def test_view_shapes(height, width, ratios, setr, expected):
    assert si.view_shapes(height, width, settings(ratios=ratios, setr_multi_scale=setr)) == expected


def test_view_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match=r'gave images of \(1, 3, 20, 20\)'):
        si.segment(Pointwise(), lambda shape: random_images(20, 20), (30, 30), settings(img_scale=(40, 30)))


@pytest.mark.parametrize(('changes', 'message'), [
    ({'stride': (641, 426)}, 'leaves pixels no window covers'), ({'mode': 'sliding'}, 'must be one of'),
    ({'ratios': (0.5, 0.0)}, 'must be positive'), ({'windows_per_forward': 0}, 'must be positive'),
    ({'img_scale': (2560,)}, 'two positive sizes'), ({'crop_size': (0, 640)}, 'two positive sizes')])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        settings(**changes)


def config_with(*opts):
    config = get_default_config()
    merge_opts(config, ['DATA.IMAGE_SIZE', '640', *opts])
    return config


def test_settings_from_config():
    config = config_with('SEG.MS_RATIOS', '[0.5, 1, 1.75]', 'SEG.FLIP', 'True')
    assert si.settings_from_config(config) == settings(ratios=(0.5, 1.0, 1.75), flip=True)
    assert si.settings_from_config(config_with()) == settings()


@pytest.mark.parametrize(('opts', 'message'), [
    (['SEG.TEST_MODE', 'sliding'], r"^-opts: SEG.TEST_MODE: the test mode must be one of .*'sliding'"),
    (['SEG.SLIDE_STRIDE', '700'], r'^-opts: SEG.SLIDE_STRIDE and DATA.IMAGE_SIZE: .* no window covers'),
    (['SEG.MS_RATIOS', '[-1.0]'], r'^-opts: SEG.MS_RATIOS: scale ratios must be positive'),
    (['SEG.MS_RATIOS', "['a']"], r'^-opts: SEG.MS_RATIOS must be numbers'),
    (['SEG.WINDOWS_PER_FORWARD', '0'], r'^-opts: SEG.WINDOWS_PER_FORWARD: windows per forward must be positive')])
def test_bad_config_values_are_refused_naming_the_keys(opts, message):
    with pytest.raises(ConfigError, match=message):
        si.settings_from_config(config_with(*opts))


def test_an_image_scale_of_one_size_is_refused():
    with pytest.raises(ConfigError, match='SEG.IMG_SCALE: the test scale needs two sizes'):
        si.settings_from_config(config_with('SEG.IMG_SCALE', '[640]'))


def test_a_fixed_grid_beit_segments_an_image_shorter_than_the_crop():
    """The reason for padding: the project's BEiT takes only its DATA.IMAGE_SIZE (32 here); an image whose short
    side stays under the crop after resizing (10 x 60 -> 21 x 128) runs padded, and fails unpadded as it would in
    mmseg."""
    beit = build_beit(tiny_config())
    beit.eval()
    head = paddle.to_tensor(np.random.default_rng(9).standard_normal((5, 96, 1, 1)), 'float32')

    def model(images):
        return F.conv2d(beit.forward_intermediates(images, indices=[3], intermediates_only=True)[0], head)

    image = np.random.default_rng(4).standard_normal((1, 3, 10, 60)).astype(np.float32)
    tiny = si.InferenceSettings(crop_size=(32, 32), stride=(21, 21), img_scale=(128, 32))
    assert si.view_shapes(10, 60, tiny) == [(21, 128)]
    view = np_resize(image, (21, 128)).astype(np.float32)
    probs = si.segment_probs(model, lambda shape: view, (10, 60), tiny)
    expected = paddle.zeros([1, 5, 21, 128])
    for left, right in restated_spans(128, 32, 21):
        padded = F.pad(paddle.to_tensor(view[..., left:right]), [0, 0, 0, 11])
        logits = F.interpolate(model(padded), size=[32, 32], mode='bilinear', align_corners=False)
        expected[..., left:right] += logits[:, :, :21]
    expected = expected / paddle.to_tensor(si.window_counts(21, 128, tiny))
    expected = F.softmax(F.interpolate(expected, size=[10, 60], mode='bilinear', align_corners=False), axis=1)
    np.testing.assert_allclose(probs.numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match='DATA.IMAGE_SIZE'):
        si.segment_probs(model, lambda shape: view, (10, 60), replace(tiny, pad_to_crop=False))
