"""Every read of a Paddle name that is not public API, in one place (Paddle 3.3.1; paths below are relative to the
installed ``paddle`` package). Each function says what it reads and why no public API does; tests/
test_paddle_internals.py checks each against the installed Paddle, so an upgrade that renames or changes one
fails a test named after it instead of a training run.
"""
import paddle
from paddle.base import core, libpaddle
from paddle.framework import io as _paddle_io
from paddle.framework import io_utils as _paddle_io_utils

# The key under which paddle.save (Paddle 2.0's layout) stores the structured-name -> parameter-name table
# (framework/io.py, ``_build_saved_state_dict`` and ``load``).
PARAMETER_NAME_TABLE = 'StructuredToParameterName@@'

# The global paddle.save pickles for a random generator's state (``paddle.get_rng_state()``).
GENERATOR_STATE_GLOBAL = 'paddle.base.libpaddle.GeneratorState'
GeneratorState = libpaddle.GeneratorState


def found_inf(scaler: paddle.amp.GradScaler) -> paddle.Tensor:
    """The bool tensor (on the device) in which ``scaler.unscale_`` recorded inf/nan among the gradients.

    amp/grad_scaler.py: ``AmpScaler._unscale`` writes ``self._found_inf``, ``step`` hands it to the optimizer
    kernels. The public methods (``is_enable``, the loss-scaling getters, ``state_dict``) do not expose it, and
    ``step`` only skips the update; the engine needs the verdict as a device tensor, to count skipped steps in
    the step's one all-reduce."""
    return scaler._found_inf


def random_resized_crop_box(crop: paddle.vision.transforms.RandomResizedCrop, image) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the box ``crop`` would cut from ``image``: the same draw, the same random
    calls, without cropping or resizing.

    vision/transforms/transforms.py: ``RandomResizedCrop._dynamic_get_param``. The public call (``crop(image)``,
    through ``_apply_image``) draws, crops and resizes in one; a two-view crop needs the box itself to resize it
    twice, and redrawing it here would change the random stream."""
    return crop._dynamic_get_param(image)


def layer_norm_epsilon(layer: paddle.nn.LayerNorm) -> float:
    """The epsilon ``layer`` was built with.

    nn/layer/norm.py: ``LayerNorm.__init__`` keeps it as ``self._epsilon``; there is no public attribute or
    getter (only ``extra_repr``'s text shows it)."""
    return layer._epsilon


def cpu_supports_bfloat16() -> bool:
    """oneDNN's check of this CPU for bfloat16 kernels (what Paddle Inference's bf16 path needs).

    base/core (the C++ module): ``supports_bfloat16``. The public ``paddle.amp.is_bfloat16_supported`` (amp/
    __init__.py) asks ``core.is_bfloat16_supported(place)``, the AMP check of a place, a different C++ function
    whose agreement with oneDNN's on every CPU the Python sources cannot show."""
    return core.supports_bfloat16()


def set_cpu_threads(count: int) -> None:
    """Set the threads Paddle's CPU kernels use in this process.

    base/core (the C++ module): ``set_num_threads``. Paddle 3.3.1 has no public setter: ``paddle`` and
    ``paddle.device`` export none, and Paddle Inference's ``Config.set_cpu_math_library_num_threads`` applies to
    a predictor only."""
    core.set_num_threads(count)


def pack_split_arrays(loaded: dict) -> dict:
    """``loaded`` (an unpickled paddle.save dict) with the large arrays that pickle protocols 2 and 3 split into
    slices joined again.

    framework/io_utils.py: ``_pack_loaded_dict``, the step ``paddle.load`` runs after unpickling; no public
    function does it on an already unpickled object."""
    return _paddle_io_utils._pack_loaded_dict(loaded)


def parse_load_result(obj, return_numpy: bool):
    """What ``paddle.load`` returns for the unpickled ``obj``: arrays and (name, array) pairs as Tensors (or
    arrays with ``return_numpy``), recursively.

    framework/io.py: ``_parse_load_result``, ``paddle.load``'s own post-processing; ``paddle.load`` itself would
    unpickle the file with no allow-list."""
    return _paddle_io._parse_load_result(obj, return_numpy)


def ndarray_to_tensor(array, return_numpy: bool):
    """``array`` as ``paddle.load`` returns an array: a Tensor, or the array itself with ``return_numpy``.

    framework/io.py: ``_ndarray_to_tensor``, used by ``paddle.load`` for Paddle 2.0's named parameters."""
    return _paddle_io._ndarray_to_tensor(array, return_numpy)


class LossScaler(paddle.amp.GradScaler):
    """Paddle's GradScaler, its loss-scale update (a private hook) written without the bug that stops a float16 run on
    a GPU.

    Paddle 3.3.1's ``AmpScaler._update`` (amp/grad_scaler.py) prints ``float(self._scale)`` when it lowers the scale
    after inf/nan gradients; ``_scale`` has shape [1], and ``Tensor.__float__`` (base/dygraph/math_op_patch.py)
    calls ``float(np.array(var))``, which numpy 2.4 refuses ("TypeError: only 0-dimensional arrays can be converted
    to Python scalars"): the first overflowing step of a float16 run would end it. Same rule, same state: after
    ``decr_every_n_nan_or_inf`` steps with inf/nan the scale is multiplied by ``decr_ratio``, after
    ``incr_every_n_steps`` clean steps by ``incr_ratio`` (tests/test_paddle_internals.py holds it to that rule, and
    checks that Paddle still calls this hook)."""

    def _update(self) -> None:
        if not self._enable:
            return
        if self._cache_found_inf:
            self._incr_count, self._decr_count = 0, self._decr_count + 1
            if self._decr_count == self._decr_every_n_nan_or_inf:
                self._scale, self._decr_count = self._scale * self._decr_ratio, 0
        else:
            self._decr_count, self._incr_count = 0, self._incr_count + 1
            if self._incr_count == self._incr_every_n_steps:
                self._scale, self._incr_count = self._scale * self._incr_ratio, 0
