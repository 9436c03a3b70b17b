"""What the converters share (load_pytorch_weights.py, load_dalle_weights.py, load_seg_weights.py): a PyTorch
checkpoint (.pth, .bin, .safetensors) read into numpy arrays without running code from the file, and put in
Paddle's layout; the -check verdict and the write of the converted file; and timm's ``Beit`` arguments for a config,
the reference the conversion is checked against (and benchmark.py's).
"""
import argparse
import collections
import json
import os
import pickle
import re
import struct
import sys
import warnings

import numpy as np
import paddle
import paddle.nn as nn

from checkpoint import unwrap_state_dict
from errors import EXIT_BAD_INPUT, BadInputError
from utils import save_atomically

_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': np.uint16,
                       'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                       'BOOL': np.bool_}
CHECK_TOLERANCE = 1e-4  # -check: the largest absolute output difference to the reference a conversion may have
_TRUST_HINT = ' (if you trust the file, add -trust_pickle)'


class ConversionError(BadInputError):
    """The source file is missing, unreadable or not a checkpoint."""


class RefusedPickleError(ConversionError):
    """The file pickles a class that the weights-only unpickler does not rebuild (-trust_pickle would, where the
    caller offers it: the message then says so)."""


def read_safetensors(path: str) -> dict:
    """name -> numpy array; bfloat16 is widened to float32 (numpy has no bfloat16)."""
    with open(path, 'rb') as f:
        data = f.read()
    if len(data) < 8:
        raise ConversionError(f'{path}: too short for a safetensors file ({len(data)} bytes)')
    (header_size,) = struct.unpack('<Q', data[:8])
    if header_size > len(data) - 8:
        raise ConversionError(f'{path}: not a safetensors file, or truncated (header of {header_size} bytes)')
    try:
        header = json.loads(data[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f'{path}: not a safetensors file (unreadable header: {err})') from err
    body = memoryview(data)[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        start, end = info['data_offsets']
        if info['dtype'] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f'{path}: {name} has the unsupported dtype {info["dtype"]}')
        if end > len(body):
            raise ConversionError(f'{path}: truncated, {name} ends at byte {end} of {len(body)}')
        array = np.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[info['dtype']]).reshape(info['shape'])
        if info['dtype'] == 'BF16':
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


def read_torch_checkpoint(path: str, trust_pickle: bool = False, module_classes: tuple[str, ...] = ()) -> dict:
    """The (possibly wrapped) object saved by ``torch.save``, with tensors as numpy arrays and a module pickled
    whole as its state dict.

    ``module_classes``: qualified names of the nn.Module classes of a file that pickles a whole module (such as
    ``dall_e.encoder.Encoder``); such files are read by ``_ModuleUnpickling`` instead of torch's weights-only
    unpickler, in the zip and the legacy format alike, without importing the classes' package.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError(f'{path}: reading .pth/.bin files needs PyTorch (pip install torch); '
                              '.safetensors files convert without it') from None
    try:
        if module_classes:
            with warnings.catch_warnings():  # the legacy format compares the classes' source with the stand-ins'
                warnings.simplefilter('ignore', torch.serialization.SourceChangeWarning)
                obj = torch.load(path, map_location='cpu', weights_only=False,
                                 pickle_module=_ModuleUnpickling(module_classes, torch))
        else:
            # unilm checkpoints also hold their argparse Namespace: allow it, but no other code objects.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        refused = re.search(r'Unsupported global: GLOBAL (\S+)', str(err))
        if refused:
            hint = '' if module_classes else _TRUST_HINT  # -trust_pickle reads a file with torch's full unpickler
            raise RefusedPickleError(f'{path}: not a readable PyTorch checkpoint: it pickles {refused.group(1)}, '
                                     f'which is not unpickled here{hint}') from err
        raise ConversionError(f'{path}: not a readable PyTorch checkpoint: {_load_failure(err)}') from err
    return _tensors_to_numpy(obj, torch)


class _ModuleUnpickling:
    """A pickle module for ``torch.load`` that rebuilds tensors, their containers and the named nn.Module
    classes (as plain ``torch.nn.Module``, parameters intact) and refuses every other global, so no code from the
    file runs. torch's weights-only unpickler cannot read a module pickled in the legacy format (it also records
    the classes' source code there), which OpenAI's files from 2021 may use."""

    def __init__(self, module_classes: tuple[str, ...], torch):
        allowed = {('collections', 'OrderedDict'): collections.OrderedDict,
                   ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
                   ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
                   ('torch', 'device'): torch.device, ('builtins', 'set'): set, ('__builtin__', 'set'): set}
        allowed.update({tuple(name.rsplit('.', 1)): torch.nn.Module for name in module_classes})

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) not in allowed:
                    raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {module}.{name}')
                return allowed[(module, name)]

        self.Unpickler = Unpickler
        self.__name__ = 'module_unpickling'

    def load(self, file, **kwargs):
        return self.Unpickler(file, **kwargs).load()


def _load_failure(err: Exception) -> str:
    """torch's reason in one line (its weights-only errors bury it in a paragraph; an empty file has none)."""
    text = str(err)
    detail = re.search(r'WeightsUnpickler error:\s*(.+)', text)
    if detail:
        return detail.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else f'{type(err).__name__} (empty or truncated file?)'


def _tensors_to_numpy(obj, torch):
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    if isinstance(obj, torch.nn.Module):
        return _tensors_to_numpy(obj.state_dict(), torch)
    if isinstance(obj, dict):
        return {key: _tensors_to_numpy(value, torch) for key, value in obj.items()}
    return obj


def read_checkpoint(path: str, trust_pickle: bool = False, module_classes: tuple[str, ...] = ()) -> dict:
    """name -> numpy array in PyTorch layout, from any supported file (see read_torch_checkpoint)."""
    if not os.path.isfile(path):
        raise ConversionError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        return unwrap_state_dict(read_safetensors(path), path)
    return unwrap_state_dict(read_torch_checkpoint(path, trust_pickle, module_classes), path)


def partition_tensors(tensors: dict, *, kept_prefixes: tuple[str, ...],
                      dropped_groups: tuple[tuple[str | tuple[str, ...], str], ...]) -> tuple[dict, dict, list]:
    """(tensors to keep, group description -> names dropped, names of no group) of a foreign checkpoint: a name
    starting with one of ``kept_prefixes`` is kept; otherwise the first group whose prefix (or prefixes) it starts
    with names why it is dropped. A converter refuses a file with names of no group: another model's."""
    kept, dropped, unknown = {}, {}, []
    for name, value in tensors.items():
        if name.startswith(kept_prefixes):
            kept[name] = value
            continue
        group = next((description for prefixes, description in dropped_groups if name.startswith(prefixes)), None)
        if group is None:
            unknown.append(name)
        else:
            dropped.setdefault(group, []).append(name)
    return kept, dropped, unknown


def report_dropped(dropped: dict) -> None:
    """Print what partition_tensors dropped, group by group, with the first names of each."""
    for group, names in dropped.items():
        print(f'dropped {group}: {len(names)} tensors ({", ".join(names[:2])}{", ..." if len(names) > 2 else ""})')


def linear_weight_names(model: nn.Layer) -> set:
    return {f'{name}.weight' for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}


def to_paddle_layout(torch_state_dict: dict, model: nn.Layer) -> dict:
    """Transpose Linear weights ([out, in] in PyTorch, [in, out] in Paddle); nothing else changes."""
    linears = linear_weight_names(model) | {'lm_head.weight'}
    converted = {}
    for name, value in torch_state_dict.items():
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(np.float32, copy=False)
        converted[name] = value.T.copy() if name in linears and value.ndim == 2 else value
    return converted


def timm_kwargs_from_config(config, mim: bool = False) -> dict:
    """Arguments of timm's ``Beit`` for the architecture in ``config`` (load_pytorch_weights.py's -check,
    benchmark.py's timm column); with ``mim`` the encoder of the pre-training model (no head, final norm on all
    tokens)."""
    m = config.MODEL
    return dict(img_size=config.DATA.IMAGE_SIZE, patch_size=m.PATCH_SIZE, in_chans=config.DATA.IMAGE_CHANNELS,
                num_classes=0 if mim else m.NUM_CLASSES, embed_dim=m.EMBED_DIM, depth=m.DEPTH, num_heads=m.NUM_HEADS,
                mlp_ratio=m.MLP_RATIO, qkv_bias=m.QKV_BIAS, init_values=m.INIT_VALUES,
                use_abs_pos_emb=m.USE_ABS_POS_EMB, use_rel_pos_bias=m.USE_REL_POS_BIAS,
                use_shared_rel_pos_bias=m.USE_SHARED_REL_POS_BIAS,
                global_pool='avg' if m.USE_MEAN_POOLING and not mim else 'token', head_init_scale=m.INIT_SCALE)


def write_converted(state_dict: dict, dst: str, *, difference: float | None = None, reference: str = '',
                    outputs: str = 'logit') -> None:
    """Write the converted tensors to ``dst`` (atomically), unless -check measured a ``difference`` of the
    ``outputs`` to the ``reference`` beyond CHECK_TOLERANCE: then nothing is written."""
    if difference is not None:
        print(f'max abs {outputs} difference to {reference}: {difference:.3g} (tolerance {CHECK_TOLERANCE:g})')
        if difference > CHECK_TOLERANCE:
            raise ConversionError(f'outputs differ from {reference} by {difference:.3g}; {dst} not written')
    save_atomically({name: paddle.to_tensor(value) for name, value in state_dict.items()}, dst)
    print(f'wrote {len(state_dict)} tensors to {dst}')


def conversion_exit_code(convert, *args) -> int:
    """A converter script's exit code: 0, or EXIT_BAD_INPUT after printing why ``convert(*args)`` refused its
    input (it wrote nothing)."""
    try:
        convert(*args)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
