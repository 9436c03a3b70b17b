"""Convert OpenAI's CLIP ViT image encoder (ViT-B-16.pt) to the Paddle state dict build_clip_teacher loads.

    python load_clip_weights.py -src ViT-B-16.pt -dst clip_vit_b16.pdparams [-check]

OpenAI's released ViT-B-16.pt is a TorchScript archive (a zip of data.pkl, code/, constants.pkl and the tensor
data). It is read here without TorchScript and without running anything from the file: data.pkl is unpickled with
an allow-list (tensors, their storages, and the archive's ``__torch__.*`` modules rebuilt as attribute holders, the
code in code/ never read), and each module's tensors collected under their attribute path, which gives the names of
OpenAI's state dict. An archive that pickles anything else is refused, with the command that saves a plain state
dict instead. A plain state dict (``torch.save(model.state_dict())``, read with torch's weights-only unpickler, or
.safetensors) converts as well. Only the image encoder (``visual.*``) is kept; the text encoder, ``logit_scale``
and the archive's settings are dropped (named on stdout). The size is read from the shapes, the head count is
OpenAI's width // 64. -check compares the patch features with OpenAI's own code (the clip package's model.py) on
random images. Nothing is written unless the whole file fits.
"""
import argparse
import importlib.util
import pickle
import sys
import zipfile

import numpy as np
import paddle

from clip_teacher import CLIPTeacher, CLIPWeightsError, check_state_dict_fits, clip_kwargs_from_state_dict
from torch_checkpoint import (
    CHECK_TOLERANCE,
    ConversionError,
    conversion_exit_code,
    partition_tensors,
    read_checkpoint,
    report_dropped,
    to_paddle_layout,
    write_converted,
)

STATE_DICT_COMMAND = ('python -c "import clip, torch; m,_=clip.load(\'ViT-B/16\', device=\'cpu\', jit=False); '
                      'torch.save(m.state_dict(), \'clip_vit_b16.pt\')"')
REQUIRED = ('visual.conv1.weight', 'visual.class_embedding', 'visual.positional_embedding', 'visual.proj',
            'visual.transformer.resblocks.0.attn.in_proj_weight')
# What the teacher does not need, by what it is (the first matching prefix names a tensor's group).
DROPPED_GROUPS = (
    (('transformer.', 'token_embedding.', 'positional_embedding', 'ln_final.', 'text_projection'), 'the text encoder'),
    (('logit_scale',), 'the contrastive logit scale'),
    (('input_resolution', 'context_length', 'vocab_size'), 'the TorchScript archive\'s settings'),
)
_STORAGE_DTYPES = {'FloatStorage': np.float32, 'HalfStorage': np.float16, 'DoubleStorage': np.float64,
                   'BFloat16Storage': np.uint16, 'LongStorage': np.int64, 'IntStorage': np.int32,
                   'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_}
CHECK_IMAGES = 2  # random images of -check
_OPENAI_MODULE = 'openai_clip_model'


# --- TorchScript archives ----------------------------------------------------------------------------------------

def is_torchscript_archive(path: str) -> bool:
    """A zip holding ``<archive>/constants.pkl``: what torch.jit.save writes and torch.save does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.count('/') == 1 and name.endswith('/constants.pkl') for name in archive.namelist())


class _ScriptObject:
    """Every TorchScript object of data.pkl (a module), rebuilt as its pickled state only: no method of its class
    exists here, so nothing from the file can run."""

    def __setstate__(self, state):
        self.state = state


class _TorchScriptUnpickler(pickle.Unpickler):
    """data.pkl with tensors rebuilt as numpy arrays from the archive's data/ records, ``__torch__.*`` classes as
    _ScriptObject subclasses, and every other global refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(archive.open(f'{prefix}/data.pkl'))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if module.startswith('__torch__'):
            return _ScriptObject
        if module == 'torch' and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return _rebuild_tensor
        if (module, name) == ('collections', 'OrderedDict'):
            return dict
        raise CLIPWeightsError(f'{self.path}: a TorchScript archive whose data.pkl pickles {module}.{name}, which '
                               'is not read here (it could run code): save a plain state dict with OpenAI\'s clip '
                               f'package and convert that: {STATE_DICT_COMMAND}')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
            raise pickle.UnpicklingError(f'unknown persistent reference {pid!r}')
        _, dtype, key, _, numel = pid
        if dtype not in _STORAGE_DTYPES.values():
            raise pickle.UnpicklingError(f'storage {key} of no known type ({dtype!r})')
        if key not in self.storages:
            data = self.archive.read(f'{self.prefix}/data/{key}')
            storage = np.frombuffer(data, dtype=dtype)
            if storage.size != numel:
                raise pickle.UnpicklingError(f'storage {key} holds {storage.size} elements, data.pkl says {numel}')
            if dtype is np.uint16:  # bfloat16, which numpy lacks: the high half of a float32
                storage = (storage.astype(np.uint32) << 16).view(np.float32)
            self.storages[key] = storage
        return self.storages[key]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_) -> np.ndarray:
    """The tensor viewing ``storage`` from ``offset`` with ``size`` and ``stride`` (in elements), copied; a view
    reaching outside the storage is refused rather than read."""
    if any(s < 0 for s in (offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f'a tensor of size {size}, stride {stride} at offset {offset}')
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size:
        raise pickle.UnpicklingError(f'a tensor of size {size}, stride {stride} at offset {offset} reaches past its '
                                     f'storage of {storage.size} elements')
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=strides).copy()


def _collect_tensors(obj, prefix: str, tensors: dict) -> None:
    """Every array in ``obj``'s state under its dotted attribute path (a module's state_dict names)."""
    state = obj.state if isinstance(getattr(obj, 'state', None), dict) else {}
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            tensors[f'{prefix}{name}'] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f'{prefix}{name}.', tensors)


def read_torchscript_archive(path: str) -> dict:
    """name -> numpy array (float32 for bfloat16) of the module pickled in the TorchScript archive ``path``."""
    with zipfile.ZipFile(path) as archive:
        prefixes = sorted({name.split('/')[0] for name in archive.namelist()
                           if name.count('/') == 1 and name.endswith('/data.pkl')})
        if len(prefixes) != 1:
            raise ConversionError(f'{path}: a TorchScript archive with {len(prefixes)} data.pkl records, not one')
        try:
            root = _TorchScriptUnpickler(archive, prefixes[0], path).load()
        except CLIPWeightsError:
            raise
        except Exception as err:  # a malformed pickle or record fails in many ways
            raise ConversionError(f'{path}: not a readable TorchScript archive ({type(err).__name__}: {err})') from err
    if not isinstance(root, _ScriptObject):
        raise ConversionError(f'{path}: a TorchScript archive that holds a {type(root).__name__}, not a module')
    tensors = {}
    _collect_tensors(root, '', tensors)
    return tensors


# --- OpenAI's CLIP files -----------------------------------------------------------------------------------------

def read_clip_checkpoint(path: str, trust_pickle: bool) -> dict:
    """name -> numpy array of a TorchScript archive or any checkpoint read_checkpoint reads."""
    if is_torchscript_archive(path):
        return read_torchscript_archive(path)
    return read_checkpoint(path, trust_pickle)


def split_state_dict(tensors: dict, source: str) -> tuple[dict, dict]:
    """(the image encoder's tensors, group description -> names dropped); a file that is not a CLIP ViT, or holds
    tensors of no known group, is refused."""
    if any(name.startswith('visual.layer1.') for name in tensors):
        raise CLIPWeightsError(f'{source}: a ResNet CLIP (visual.layer1.*): only CLIP\'s ViT image encoders convert')
    absent = [name for name in REQUIRED if name not in tensors]
    if absent:
        raise CLIPWeightsError(f'{source}: not a CLIP ViT of OpenAI\'s clip package (no {", ".join(absent)} among '
                               f'its {len(tensors)} tensors, e.g. {", ".join(list(tensors)[:3])})')
    kept, dropped, unknown = partition_tensors(tensors, kept_prefixes=('visual.',), dropped_groups=DROPPED_GROUPS)
    if unknown:
        raise CLIPWeightsError(f'{source}: {len(unknown)} tensors of no part of OpenAI\'s CLIP: {unknown[:3]}')
    return kept, dropped


def openai_clip_model():
    """OpenAI's clip/model.py, imported from the installed clip package (pip install --no-deps openai-clip==1.0.1)
    as the module ``openai_clip_model``: ``import clip`` would run clip/__init__.py, which imports the tokenizer
    and downloader (ftfy, regex, tqdm, pkg_resources), none of which the model needs."""
    if _OPENAI_MODULE in sys.modules:
        return sys.modules[_OPENAI_MODULE]
    spec = importlib.util.find_spec('clip')
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError('-check needs OpenAI\'s clip package: pip install --no-deps openai-clip==1.0.1')
    model_spec = importlib.util.spec_from_file_location(_OPENAI_MODULE,
                                                        f'{spec.submodule_search_locations[0]}/model.py')
    module = importlib.util.module_from_spec(model_spec)
    model_spec.loader.exec_module(module)
    sys.modules[_OPENAI_MODULE] = module  # registered once complete, so that its classes pickle
    return module


def openai_patch_features(state_dict: dict, kwargs: dict, images: np.ndarray) -> np.ndarray:
    """unilm's CLIP target for ``images`` in [0, 1], computed with OpenAI's VisionTransformer: its blocks' output
    (caught by a hook, as OpenAI's forward normalises the class token only), ``ln_post`` on all tokens, ``@ proj``,
    the class token dropped; the input clamped to [0, 1] and normalised with CLIP's mean and std."""
    import torch

    from clip_teacher import CLIP_MEAN, CLIP_STD

    visual = openai_clip_model().VisionTransformer(**kwargs).eval()
    visual.load_state_dict({name[len('visual.'):]: torch.from_numpy(value) for name, value in state_dict.items()})
    tokens = []
    visual.transformer.register_forward_hook(lambda module, args, output: tokens.append(output))
    mean, std = (torch.tensor(values).reshape(1, 3, 1, 1) for values in (CLIP_MEAN, CLIP_STD))
    with torch.no_grad():
        visual((torch.from_numpy(images).clamp(0, 1) - mean) / std)
        all_tokens = tokens[0].permute(1, 0, 2)  # OpenAI's blocks run sequence-first
        return (visual.ln_post(all_tokens) @ visual.proj)[:, 1:].numpy()


def check_difference(model: CLIPTeacher, state_dict: dict, kwargs: dict) -> float:
    """Max abs patch-feature difference of ``model`` (converted weights loaded) to OpenAI's code."""
    size = kwargs['input_resolution']
    images = np.random.default_rng(0).random((CHECK_IMAGES, 3, size, size), dtype=np.float32)
    expected = openai_patch_features(state_dict, kwargs, images)
    actual = model.eval().patch_features(paddle.to_tensor(images)).numpy()
    return float(np.abs(actual - expected).max())


def convert_file(src: str, dst: str, check: bool = False, trust_pickle: bool = False) -> dict:
    """Write the image encoder in ``src`` to ``dst`` atomically (after -check, if asked); returns its size."""
    kept, dropped = split_state_dict(read_clip_checkpoint(src, trust_pickle), src)
    kwargs = clip_kwargs_from_state_dict(kept, src)
    with paddle.LazyGuard():  # the shapes are all that is needed here: no random init of 86M parameters
        model = CLIPTeacher(**kwargs)
    state_dict = to_paddle_layout(kept, model)
    check_state_dict_fits(state_dict, model, src)
    print(f'CLIP ViT image encoder: {", ".join(f"{key}={value}" for key, value in kwargs.items())}')
    report_dropped(dropped)
    difference = None
    if check:
        model = CLIPTeacher(**kwargs)
        model.set_state_dict(state_dict)
        difference = check_difference(model, {name: value.astype(np.float32) for name, value in kept.items()},
                                      kwargs)
    write_converted(state_dict, dst, difference=difference, reference='OpenAI\'s CLIP', outputs='patch feature')
    return kwargs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert OpenAI\'s CLIP ViT image encoder (ViT-B-16.pt) to Paddle')
    parser.add_argument('-src', required=True, help='ViT-B-16.pt (TorchScript), or a state dict of OpenAI\'s CLIP')
    parser.add_argument('-dst', required=True, help='output .pdparams')
    parser.add_argument('-check', action='store_true',
                        help=f'compare patch features with OpenAI\'s code (needs torch and the clip package, '
                             f'pip install --no-deps openai-clip==1.0.1); nothing is written above '
                             f'{CHECK_TOLERANCE:g}')
    parser.add_argument('-trust_pickle', action='store_true',
                        help='read a plain state dict with torch\'s full unpickler (never used for TorchScript)')
    args = parser.parse_args(argv)
    return conversion_exit_code(convert_file, args.src, args.dst, args.check, args.trust_pickle)


if __name__ == '__main__':
    sys.exit(main())
