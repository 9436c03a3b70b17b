"""The frozen teachers of VQ-KD tokenizer training: whose patch features the tokenizer's decoder reconstructs.

A teacher is a frozen layer in eval mode with ``feature_dim`` and ``patch_features(images)``: images [B, 3, H, W]
in [0, 1], not normalised (it normalises them itself) -> float32 [B, N, feature_dim], the patch tokens in the
row-major order of the tokenizer's grid (no cls token). ``TEACHERS`` maps VQKD.TEACHER to its entry: how to check
the config (before anything is built), the feature width (to build the decoder before the teacher) and how to
build it.

'beit': any BEiT this project loads (a classification or pre-training .pdparams, or a training checkpoint),
described by the BEiT config VQKD.TEACHER_CFG. Its features are those unilm's teachers give with
``return_patch_tokens``: the final block's patch tokens after the model's final norm (``fc_norm``, token by token,
for a mean-pooling model; ``norm`` otherwise), the representation its head was trained on. Images are normalised
with the teacher config's DATA.IMAGENET_MEAN / STD; its DATA.IMAGE_SIZE and patch grid must be the tokenizer's.

'clip': OpenAI's CLIP image encoder (clip_teacher.py), unilm's teacher: VQKD.TEACHER_WEIGHTS is the file
load_clip_weights.py writes, whose shapes give its size; its input resolution and grid must be the tokenizer's.
"""
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import paddle
import paddle.nn as nn

import weights_file
from beit import Beit, build_beit
from checkpoint import load_pretrained
from clip_teacher import CLIPWeightsError, build_clip_teacher, clip_file_sizes
from config import ConfigError, check_teacher_file, get_config, named_origin
from errors import BadInputError


class TeacherWeightsError(BadInputError):
    """Teacher weights that are missing, unreadable or not of the teacher the config describes."""


class BeitTeacher(nn.Layer):
    """A frozen BEiT giving its final patch tokens after the final norm."""

    def __init__(self, model: Beit, mean, std):
        super().__init__()
        self.model = model
        self.feature_dim = model.embed_dim
        self.register_buffer('mean', paddle.to_tensor(mean, dtype='float32').reshape([1, -1, 1, 1]),
                             persistable=False)
        self.register_buffer('std', paddle.to_tensor(std, dtype='float32').reshape([1, -1, 1, 1]),
                             persistable=False)
        weights_file.frozen(self)  # eval mode: no dropout or drop path in the targets

    @paddle.no_grad()
    def patch_features(self, images: paddle.Tensor) -> paddle.Tensor:
        patches = self.model.forward_tokens((images - self.mean) / self.std)[:, 1:]
        if self.model.fc_norm is not None:
            patches = self.model.fc_norm(patches)
        return patches.astype('float32')


def teacher_config(config):
    """The BEiT config VQKD.TEACHER_CFG names (ConfigError naming the key when it cannot be read)."""
    check_teacher_file(config, 'VQKD.TEACHER_CFG')
    try:
        return get_config(config.VQKD.TEACHER_CFG)
    except ConfigError as err:
        raise ConfigError(f'VQKD.TEACHER_CFG: {err}') from None


def check_same_grid(config, teacher_size: int, teacher_patch: int, teacher: str) -> None:
    """The teacher (described by ``teacher``) sees the tokenizer's images and patch grid (ConfigError otherwise)."""
    size, grid = config.DATA.IMAGE_SIZE, config.DATA.IMAGE_SIZE // config.VQKD.PATCH_SIZE
    teacher_grid = teacher_size // teacher_patch
    if (teacher_size, teacher_grid) != (size, grid):
        raise ConfigError(named_origin(config, 'DATA.IMAGE_SIZE', 'VQKD.PATCH_SIZE')
                          + f'{teacher}, a {teacher_grid}x{teacher_grid} grid) must see the tokenizer\'s images and '
                          f'grid (DATA.IMAGE_SIZE {size}, VQKD.PATCH_SIZE {config.VQKD.PATCH_SIZE}, a {grid}x{grid} '
                          'grid)')


def check_beit_teacher(config) -> None:
    """The teacher config reads, and its input and patch grid are the tokenizer's."""
    teacher = teacher_config(config)
    check_same_grid(config, teacher.DATA.IMAGE_SIZE, teacher.MODEL.PATCH_SIZE,
                    f'the teacher (VQKD.TEACHER_CFG {config.VQKD.TEACHER_CFG}: DATA.IMAGE_SIZE '
                    f'{teacher.DATA.IMAGE_SIZE}, MODEL.PATCH_SIZE {teacher.MODEL.PATCH_SIZE}')
    if teacher.MODEL.TO_STATIC:
        raise ConfigError(f'VQKD.TEACHER_CFG {config.VQKD.TEACHER_CFG}: MODEL.TO_STATIC: the teacher runs in dygraph')


def beit_feature_dim(config) -> int:
    return teacher_config(config).MODEL.EMBED_DIM


def build_beit_teacher(config, logger: logging.Logger | None = None) -> BeitTeacher:
    """The frozen BEiT of VQKD.TEACHER_CFG with the weights VQKD.TEACHER_WEIGHTS (the model of a training
    checkpoint, or its EMA when the teacher config sets MODEL.PRETRAINED_EMA)."""
    teacher = teacher_config(config)
    model = build_beit(teacher)
    path = config.VQKD.TEACHER_WEIGHTS
    try:
        notes, _ = load_pretrained(model, path, teacher.MODEL.PRETRAINED_EMA, teacher.MODEL.REL_POS_INTERP,
                                   trust_pickle=config.TRUST_PICKLE)
    except BadInputError as err:
        raise TeacherWeightsError(f'VQKD.TEACHER_WEIGHTS: {path} does not load into the BEiT of VQKD.TEACHER_CFG '
                                  f'{config.VQKD.TEACHER_CFG}: {err}') from None
    for note in notes:
        (logger or logging.getLogger(__name__)).info(f'teacher {path}: {note}')
    return BeitTeacher(model, teacher.DATA.IMAGENET_MEAN, teacher.DATA.IMAGENET_STD)


@dataclass(frozen=True)
class TeacherEntry:
    """``check(config)`` raises ConfigError; ``feature_dim(config)`` the width of its features;
    ``build(config)`` the frozen teacher (TeacherWeightsError for weights it cannot load)."""

    check: Callable
    feature_dim: Callable
    build: Callable


@functools.lru_cache(maxsize=2)
def _clip_sizes(path: str, trust_pickle: bool) -> dict:
    """The sizes of the CLIP file ``path`` (read once a process: the check and the decoder's width both need them)."""
    return clip_file_sizes(path, trust_pickle=trust_pickle)


def clip_sizes(config) -> dict:
    """The CLIP teacher's sizes, from VQKD.TEACHER_WEIGHTS (ConfigError naming the key when it cannot be read)."""
    check_teacher_file(config, 'VQKD.TEACHER_WEIGHTS')
    try:
        return _clip_sizes(config.VQKD.TEACHER_WEIGHTS, config.TRUST_PICKLE)
    except CLIPWeightsError as err:
        raise ConfigError(f'VQKD.TEACHER_WEIGHTS: {err}') from None


def check_clip_teacher(config) -> None:
    """The CLIP file reads, and its input resolution and patch grid are the tokenizer's."""
    sizes = clip_sizes(config)
    check_same_grid(config, sizes['input_resolution'], sizes['patch_size'],
                    f'the CLIP teacher (VQKD.TEACHER_WEIGHTS {config.VQKD.TEACHER_WEIGHTS}: '
                    f'{sizes["input_resolution"]} px, patch {sizes["patch_size"]}')


def clip_feature_dim(config) -> int:
    return clip_sizes(config)['output_dim']


def build_clip_teacher_of(config, logger: logging.Logger | None = None) -> nn.Layer:
    """The frozen CLIP image encoder of VQKD.TEACHER_WEIGHTS (load_clip_weights.py's output)."""
    path = config.VQKD.TEACHER_WEIGHTS
    try:
        return build_clip_teacher(path, trust_pickle=config.TRUST_PICKLE)
    except CLIPWeightsError as err:
        raise TeacherWeightsError(f'VQKD.TEACHER_WEIGHTS: {err}') from None


TEACHERS = {'beit': TeacherEntry(check_beit_teacher, beit_feature_dim, build_beit_teacher),
            'clip': TeacherEntry(check_clip_teacher, clip_feature_dim, build_clip_teacher_of)}
