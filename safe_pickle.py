"""Reading .pdparams files (weights, checkpoints) without running any code they might hold.

``paddle.load`` is a plain pickle load: a downloaded file can run any code while it is read. ``load`` unpickles
with an allow-list of the few globals that files written by ``paddle.save`` (Paddle 2.x and 3.x, numpy 1.x and
2.x) contain, refuses any other with UnsafePickleError naming the file and the global, and then hands the result
to Paddle's own post-processing, so it returns exactly what ``paddle.load`` returns. ``trust_pickle`` reads with
``paddle.load`` itself, for files that legitimately pickle other objects.

    import safe_pickle
    model.set_state_dict(safe_pickle.load('beit_base_patch16_224.pdparams'))
"""
import _codecs
import collections
import logging
import pickle

import numpy as np
import paddle

import paddle_internals
from errors import BadInputError
from utils import LOGGER_NAME


class UnsafePickleError(BadInputError, pickle.UnpicklingError):
    """A pickle that names a global a weights file never needs: reading it further could run code."""


def _dense_tensor_data(expression, namespace):
    """paddle.save pickles a DenseTensor as ``eval('data', {'data': array})``: that one expression, evaluated
    without eval."""
    if expression != 'data' or not isinstance(namespace, dict) or set(namespace) != {'data'}:
        raise pickle.UnpicklingError('builtins.eval is allowed only as paddle.save writes a DenseTensor')
    return namespace['data']


def _latin1_bytes(text, encoding):
    """Protocol 2 pickles bytes as ``_codecs.encode(str, 'latin1')``; no other codec is needed."""
    if encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'_codecs.encode is allowed only with latin1, not {encoding!r}')
    return _codecs.encode(text, encoding)


def _numpy_globals() -> dict:
    """numpy's array, dtype and scalar rebuilders under numpy 1.x (numpy.core) and 2.x (numpy._core) names."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    names = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype}
    for package in ('numpy.core', 'numpy._core'):
        names[f'{package}.multiarray._reconstruct'] = multiarray._reconstruct
        names[f'{package}.multiarray.scalar'] = multiarray.scalar
    return names


ALLOWED_GLOBALS = {
    # paddle.save pickles a Tensor as tuple((name, array)); protocol 2 names the builtins module __builtin__
    'builtins.tuple': tuple, '__builtin__.tuple': tuple,
    'builtins.eval': _dense_tensor_data, '__builtin__.eval': _dense_tensor_data,
    'collections.OrderedDict': collections.OrderedDict,  # Layer.state_dict()
    '_codecs.encode': _latin1_bytes,  # bytes (an array's data) under protocol 2
    # paddle.get_rng_state(): this project's checkpoints held it until 2026-12-02 (ignored by a resume since); it is
    # rebuilt from its seed, offset and engine state, numbers only
    paddle_internals.GENERATOR_STATE_GLOBAL: paddle_internals.GeneratorState,
    **_numpy_globals(),
}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding='latin1')  # as paddle.load: arrays pickled by Python 2 decode
        self.path = path

    def find_class(self, module, name):
        found = ALLOWED_GLOBALS.get(f'{module}.{name}')
        if found is None:
            raise UnsafePickleError(f'{self.path} pickles {module}.{name}, which no weights file needs and which '
                                    'could run code when read: refused (if you trust the file, add -trust_pickle)')
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f'{self.path} holds a persistent reference ({pid!r}), which paddle.save never writes')


def _as_paddle_load_returns(obj, return_numpy: bool):
    """What paddle.load makes of the unpickled object: split arrays joined, arrays and (name, array) pairs as
    Tensors (or arrays with ``return_numpy``), Paddle 2.0's name table applied and dropped."""
    if isinstance(obj, dict):
        obj = paddle_internals.pack_split_arrays(obj)
        if paddle_internals.PARAMETER_NAME_TABLE in obj:
            return _with_parameter_names(obj, return_numpy)
    return paddle_internals.parse_load_result(obj, return_numpy)


def _with_parameter_names(obj: dict, return_numpy: bool) -> dict:
    names = obj.pop(paddle_internals.PARAMETER_NAME_TABLE)
    for key, name in names.items():
        if isinstance(obj.get(key), np.ndarray):
            obj[key] = paddle_internals.ndarray_to_tensor(obj[key], return_numpy)
            if not return_numpy:
                obj[key].name = name
    return obj


def load(path: str, *, return_numpy: bool = False, trust_pickle: bool = False):
    """The object ``paddle.save`` wrote to ``path``, as ``paddle.load`` returns it; raises UnsafePickleError for a
    file that pickles anything else, before any of it runs. ``trust_pickle``: read with paddle.load (any code the
    file holds runs)."""
    if trust_pickle:
        logging.getLogger(LOGGER_NAME).warning(f'-trust_pickle: reading {path} with plain pickle (paddle.load), '
                                               'which runs any code the file holds')
        return paddle.load(path, return_numpy=return_numpy)
    with open(path, 'rb') as f:
        obj = _WeightsUnpickler(f, path).load()
    return _as_paddle_load_returns(obj, return_numpy)

