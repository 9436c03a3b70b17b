"""Each non-public Paddle name this project reads (paddle_internals.py), checked against the installed Paddle for
the behaviour the project relies on: an upgrade that renames or changes one fails the test named after it."""
import inspect
import io
import math
import os
import pickle
import random
import types

import numpy as np
import paddle
import paddle.amp.grad_scaler as paddle_grad_scaler
import paddle.nn.functional as F
import pytest
from paddle.amp.auto_cast import amp_global_state
from paddle.vision import transforms as T
from PIL import Image

import paddle_internals as internals
from engine import _unscale_and_check


class _GpuPlace:
    """What the tracer's expected place says on a GPU (GradScaler enables itself only there)."""

    def is_gpu_place(self):
        return True


class _TracerOnGpu:
    def __init__(self, tracer):
        self._tracer = tracer
        self._expected_place = _GpuPlace()

    def __getattr__(self, name):
        return getattr(self._tracer, name)


def _enabled(monkeypatch, scaler_class=paddle.amp.GradScaler, **settings):
    """A float16 ``scaler_class``, enabled as on a GPU: built while the tracer reports a GPU place, used as inside a
    float16 auto_cast (its scale() turns itself off for any other AMP dtype). Its kernels run on the CPU."""
    real_tracer = paddle_grad_scaler._dygraph_tracer
    with monkeypatch.context() as patched:
        patched.setattr(paddle_grad_scaler, '_dygraph_tracer', lambda: _TracerOnGpu(real_tracer()))
        scaler = scaler_class(**{'init_loss_scaling': 4.0, **settings})
    monkeypatch.setattr(amp_global_state(), 'amp_dtype', 'float16')
    assert scaler.is_enable()
    return scaler


@pytest.fixture
def enabled_scaler(monkeypatch):
    """Paddle's own float16 GradScaler, enabled as on a GPU (_enabled)."""
    return _enabled(monkeypatch)


def _backward_through(scaler, last_input: float):
    """A Linear's optimizer after scaler.scale(loss).backward(), the loss reading an input ending in ``last_input``
    (its weight's gradient is the input: inf or nan there makes the gradient so)."""
    layer = paddle.nn.Linear(3, 2)
    optimizer = paddle.optimizer.SGD(0.1, parameters=layer.parameters())
    scaler.scale(layer(paddle.to_tensor([[1.0, 2.0, last_input]])).sum()).backward()
    return layer, optimizer


@pytest.mark.parametrize('last_input, expected', [(3.0, False), (math.inf, True), (math.nan, True)])
def test_found_inf_is_unscale_s_verdict(enabled_scaler, last_input, expected):
    layer, optimizer = _backward_through(enabled_scaler, last_input)
    enabled_scaler.unscale_(optimizer)
    verdict = internals.found_inf(enabled_scaler)
    assert isinstance(verdict, paddle.Tensor) and verdict.dtype == paddle.bool and verdict.shape == [1]
    assert bool(verdict) is expected
    if not expected:  # unscaled: 4x / 4 (with inf/nan found, the kernel zeroes them)
        np.testing.assert_array_equal(layer.weight.grad.numpy(), [[1, 1], [2, 2], [3, 3]])


def test_found_inf_is_reset_by_the_next_unscale(enabled_scaler):
    _, optimizer = _backward_through(enabled_scaler, math.inf)
    enabled_scaler.unscale_(optimizer)
    assert bool(internals.found_inf(enabled_scaler))
    _, optimizer = _backward_through(enabled_scaler, 3.0)
    enabled_scaler.unscale_(optimizer)
    assert not bool(internals.found_inf(enabled_scaler))


@pytest.mark.parametrize('last_input, expected', [(3.0, 0.0), (math.inf, 1.0)])
def test_the_engine_reads_the_verdict_of_paddle_s_scaler(enabled_scaler, last_input, expected):
    _, optimizer = _backward_through(enabled_scaler, last_input)
    flag = _unscale_and_check(types.SimpleNamespace(grad_scaler=enabled_scaler, optimizer=optimizer))
    assert flag.dtype == paddle.float64 and flag.numpy().tolist() == [expected]


def _optimizer_step(scaler, last_input: float) -> None:
    """One training step as the engine runs it: backward, unscale, step, update."""
    _, optimizer = _backward_through(scaler, last_input)
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def test_the_loss_scaler_lowers_and_raises_the_scale_by_paddle_s_rule(monkeypatch):
    """Two steps with inf/nan halve the scale (decr_every_n_nan_or_inf 2), three clean ones double it
    (incr_every_n_steps 3); a clean step resets the count of bad ones and the other way round. Paddle's own
    update stops at the first halving here (numpy >= 2.4 refuses its float() of a shape-[1] tensor)."""
    scaler = _enabled(monkeypatch, internals.LossScaler, decr_every_n_nan_or_inf=2, incr_every_n_steps=3)
    scales = []
    for last_input in (math.inf, 3.0, math.nan, math.inf, 3.0, 3.0, 3.0, math.nan):
        _optimizer_step(scaler, last_input)
        scales.append(scaler.state_dict()['scale'].item())
    assert scales == [4.0, 4.0, 4.0, 2.0, 2.0, 2.0, 4.0, 4.0]
    state = scaler.state_dict()
    assert (state['incr_count'], state['decr_count'], state['scale'].item()) == (0, 1, 4.0)


def test_the_loss_scaler_raises_the_scale_as_paddle_s_own_scaler_does(monkeypatch):
    ours = _enabled(monkeypatch, internals.LossScaler, incr_every_n_steps=2)
    paddles = _enabled(monkeypatch, incr_every_n_steps=2)
    for _ in range(5):
        _optimizer_step(ours, 3.0)
        _optimizer_step(paddles, 3.0)
        assert ours.state_dict()['scale'].item() == paddles.state_dict()['scale'].item()


def test_paddle_s_update_still_calls_the_hook_the_loss_scaler_replaces(monkeypatch):
    scaler = _enabled(monkeypatch, internals.LossScaler)
    calls = []
    monkeypatch.setattr(internals.LossScaler, '_update', lambda self: calls.append(self))
    _optimizer_step(scaler, 3.0)
    assert calls == [scaler]


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def _gradient_image(width: int, height: int) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, x[::-1, ::-1]], axis=-1).round().astype(np.uint8))


def test_random_resized_crop_box_is_the_box_the_public_crop_cuts():
    crop = T.RandomResizedCrop(48, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bilinear')
    image = _gradient_image(120, 90)
    for seed in range(20):
        _seed(seed)
        top, left, height, width = internals.random_resized_crop_box(crop, image)
        _seed(seed)
        expected = np.asarray(crop(image))
        box = image.crop((left, top, left + width, top + height)).resize((48, 48), Image.BILINEAR)
        np.testing.assert_array_equal(np.asarray(box), expected)


def test_random_resized_crop_box_lies_in_the_image_and_follows_scale_and_ratio():
    scale, ratio = (0.2, 0.6), (0.5, 2.0)
    crop = T.RandomResizedCrop(32, scale=scale, ratio=ratio)
    image_width, image_height = 200, 160
    image = _gradient_image(image_width, image_height)
    _seed(0)
    for _ in range(200):
        top, left, height, width = internals.random_resized_crop_box(crop, image)
        assert all(isinstance(value, int) for value in (top, left, height, width))
        assert top >= 0 and left >= 0 and top + height <= image_height and left + width <= image_width
        slack = 1 / min(height, width)  # each side is rounded to a whole pixel
        assert scale[0] * (1 - 2 * slack) <= height * width / (image_width * image_height) <= scale[1] * (1 + 2 * slack)
        assert ratio[0] * (1 - 2 * slack) <= width / height <= ratio[1] * (1 + 2 * slack)


def test_random_resized_crop_box_of_a_fixed_scale_and_ratio_is_that_square_anywhere():
    crop = T.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    image = _gradient_image(200, 200)
    _seed(1)
    boxes = [internals.random_resized_crop_box(crop, image) for _ in range(100)]
    assert {(height, width) for _, _, height, width in boxes} == {(100, 100)}
    offsets = np.array([(top, left) for top, left, _, _ in boxes])
    assert offsets.min() >= 0 and offsets.max() <= 100 and len({*map(tuple, offsets)}) > 90


@pytest.mark.parametrize('epsilon', [1e-5, 1e-6, 1e-3])
def test_layer_norm_epsilon_is_the_constructor_s_and_the_one_forward_uses(epsilon):
    layer = paddle.nn.LayerNorm(8, epsilon=epsilon)
    assert internals.layer_norm_epsilon(layer) == epsilon
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 1e-3)
    expected = F.layer_norm(x, 8, layer.weight, layer.bias, internals.layer_norm_epsilon(layer))
    np.testing.assert_array_equal(layer(x).numpy(), expected.numpy())
    other = F.layer_norm(x, 8, layer.weight, layer.bias, epsilon / 10)
    assert not np.allclose(layer(x).numpy(), other.numpy())  # the inputs' variance (1e-6) makes epsilon count


def test_cpu_supports_bfloat16_is_a_bool_that_needs_avx512():
    supported = internals.cpu_supports_bfloat16()
    assert isinstance(supported, bool)
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), None)
    except OSError:
        flags = None
    if supported and flags is not None:  # oneDNN's bfloat16 kernels need AVX-512 at least
        assert 'avx512f' in flags


def test_set_cpu_threads_takes_a_count_and_keeps_the_kernels_right():
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32))
    expected = (x @ x).numpy()
    try:
        for count in (1, 2):
            internals.set_cpu_threads(count)
            np.testing.assert_allclose((x @ x).numpy(), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(TypeError):
            internals.set_cpu_threads('2')
    finally:  # back to the count Paddle started with: no getter, but its import writes it to OMP_NUM_THREADS
        internals.set_cpu_threads(int(os.environ['OMP_NUM_THREADS']))


@pytest.mark.parametrize('module, name, parameters', [
    (paddle.framework.io_utils, '_pack_loaded_dict', ['load_obj']),
    (paddle.framework.io, '_parse_load_result', ['obj', 'return_numpy']),
    (paddle.framework.io, '_ndarray_to_tensor', ['obj', 'return_numpy']),
], ids=['pack_split_arrays', 'parse_load_result', 'ndarray_to_tensor'])
def test_paddle_load_s_helpers_keep_the_signatures_we_call(module, name, parameters):
    assert list(inspect.signature(getattr(module, name)).parameters) == parameters


def test_pack_split_arrays_joins_what_protocols_2_and_3_split():
    """paddle.save splits an array above 1 GiB under protocols 2/3 into slices listed under this key (too large
    to write in a test: the layout is written by hand, as framework/io_utils.py's _unpack_saved_dict writes it)."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat = array.flatten()
    loaded = {'w@@.0': flat[:5], 'w@@.1': flat[5:], 'b': np.ones(2),
              'UnpackBigParamInfor@@': {'w': {'OriginShape': (3, 4), 'slices': ['w@@.0', 'w@@.1']}}}
    packed = internals.pack_split_arrays(loaded)
    assert set(packed) == {'w', 'b'}
    np.testing.assert_array_equal(packed['w'], array)
    assert internals.pack_split_arrays({'b': 1}) == {'b': 1}


def _saved_and_unpickled(obj, path):
    paddle.save(obj, str(path))
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='latin1')  # our own file: plain pickle is safe here


@pytest.mark.parametrize('return_numpy', [False, True])
def test_parse_load_result_turns_an_unpickled_object_into_what_paddle_load_returns(tmp_path, return_numpy):
    obj = [paddle.arange(6, dtype='float32').reshape([2, 3]), {'x': paddle.ones([2], dtype='int64'), 'n': 3}, 'text']
    parsed = internals.parse_load_result(_saved_and_unpickled(obj, tmp_path / 'list.pdparams'), return_numpy)
    expected = paddle.load(str(tmp_path / 'list.pdparams'), return_numpy=return_numpy)
    kind = np.ndarray if return_numpy else paddle.Tensor
    assert isinstance(parsed[0], kind) and isinstance(parsed[1]['x'], kind) and parsed[1]['n'] == 3
    assert parsed[2] == 'text'
    for actual, wanted in ((parsed[0], expected[0]), (parsed[1]['x'], expected[1]['x'])):
        assert np.asarray(actual).dtype == np.asarray(wanted).dtype
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(wanted))


def test_ndarray_to_tensor_makes_a_tensor_or_keeps_the_array():
    array = np.arange(4, dtype=np.float32)
    assert internals.ndarray_to_tensor(array, True) is array
    tensor = internals.ndarray_to_tensor(array, False)
    assert isinstance(tensor, paddle.Tensor) and tensor.dtype == paddle.float32
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_a_saved_state_dict_carries_the_parameter_name_table(tmp_path):
    layer = paddle.nn.Linear(2, 3)
    unpickled = _saved_and_unpickled(layer.state_dict(), tmp_path / 'linear.pdparams')
    assert unpickled[internals.PARAMETER_NAME_TABLE] == {'weight': layer.weight.name, 'bias': layer.bias.name}
    assert isinstance(unpickled['weight'], np.ndarray)


def test_a_pickled_generator_state_names_the_global_we_allow():
    state = paddle.get_rng_state(device='cpu')[0]
    assert type(state) is internals.GeneratorState
    module, name = internals.GENERATOR_STATE_GLOBAL.rsplit('.', 1)

    class Recorder(pickle.Unpickler):
        def find_class(self, found_module, found_name):
            names.append(f'{found_module}.{found_name}')
            return super().find_class(found_module, found_name)

    names = []
    restored = Recorder(io.BytesIO(pickle.dumps(state, protocol=4))).load()
    assert internals.GENERATOR_STATE_GLOBAL in names and f'{module}.{name}' == internals.GENERATOR_STATE_GLOBAL
    assert type(restored) is internals.GeneratorState and restored.current_seed() == state.current_seed()
