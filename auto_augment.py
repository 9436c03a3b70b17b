"""RandAugment and AutoAugment (which Paddle lacks) with timm's semantics: op set, magnitude scales, policies and
config-string grammar, so that seeded runs match timm's draw for draw.
"""
import math
import random
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# Augment ops. A magnitude on a 0..10 scale maps to each op's argument; signed ops pick a random direction.

MAX_LEVEL = 10.0
_TRANSLATE_FRACTION = 0.45  # largest relative shift; timm's default, which its ImageNet train transform keeps
_PIXEL_VALUES = 256  # of an 8-bit channel


def _random_sign(value: float) -> float:
    return -value if random.random() > 0.5 else value


def _rotate_degrees(level):
    return _random_sign((level / MAX_LEVEL) * 30.0)


def _shear_factor(level):
    return _random_sign((level / MAX_LEVEL) * 0.3)


def _translate_fraction(level):
    return _random_sign((level / MAX_LEVEL) * _TRANSLATE_FRACTION)


def _enhance_factor(level):
    """0.1 (strongest reduction) at level 0 up to 1.9 at level 10; 1.0 leaves the image unchanged."""
    return (level / MAX_LEVEL) * 1.8 + 0.1


def _enhance_factor_increasing(level):
    """Away from 1.0 in a random direction, further with the level; never below 0.1."""
    return max(0.1, 1.0 + _random_sign((level / MAX_LEVEL) * 0.9))


def _posterize_bits(level):
    """Keeps 0..4 bits: the strongest at level 0 (TPU EfficientNet scale)."""
    return int((level / MAX_LEVEL) * 4)


def _posterize_bits_increasing(level):
    return 4 - _posterize_bits(level)


def _posterize_bits_original(level):
    """Keeps 4..8 bits, as the AutoAugment paper describes."""
    return _posterize_bits(level) + 4


def _solarize_threshold(level):
    """Pixels at or above the threshold are inverted: 0 inverts all, 256 (_PIXEL_VALUES) none."""
    return min(_PIXEL_VALUES, int((level / MAX_LEVEL) * _PIXEL_VALUES))


def _solarize_threshold_increasing(level):
    return _PIXEL_VALUES - _solarize_threshold(level)


def _solarize_addition(level):
    return min(128, int((level / MAX_LEVEL) * 110))


def _affine(img, coefficients, fill, resample):
    return img.transform(img.size, Image.Transform.AFFINE, coefficients, resample=resample, fillcolor=fill)


def shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x(img, fraction, fill, resample):
    return _affine(img, (1, 0, fraction * img.width, 0, 1, 0), fill, resample)


def translate_y(img, fraction, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.height), fill, resample)


def rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def solarize_add(img, addition, threshold=128):
    """Brightens the pixels below ``threshold`` by ``addition`` (saturating at 255)."""
    table = [min(255, value + addition) if value < threshold else value for value in range(256)]
    return img.point(table * len(img.getbands()))


def posterize(img, bits):
    """Keeps the top ``bits`` bits of each channel. 0 bits gives black, as Pillow 10 (and so timm) did; Pillow 13
    rejects 0 bits, which reaches timm's PosterizeIncreasing at magnitude 10 and Posterize below 2.5."""
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _enhance(enhancer_class):
    return lambda img, factor: enhancer_class(img).enhance(factor)


class _OpSpec(NamedTuple):
    image_fn: Callable
    level_to_arg: Callable | None  # None: the op has no strength
    geometric: bool = False  # moves pixels, so it needs the fill colour and the resampling filter


_OPS = {
    'AutoContrast': _OpSpec(ImageOps.autocontrast, None),
    'Equalize': _OpSpec(ImageOps.equalize, None),
    'Invert': _OpSpec(ImageOps.invert, None),
    'Rotate': _OpSpec(rotate, _rotate_degrees, geometric=True),
    'Posterize': _OpSpec(posterize, _posterize_bits),
    'PosterizeIncreasing': _OpSpec(posterize, _posterize_bits_increasing),
    'PosterizeOriginal': _OpSpec(posterize, _posterize_bits_original),
    'Solarize': _OpSpec(ImageOps.solarize, _solarize_threshold),
    'SolarizeIncreasing': _OpSpec(ImageOps.solarize, _solarize_threshold_increasing),
    'SolarizeAdd': _OpSpec(solarize_add, _solarize_addition),
    'Color': _OpSpec(_enhance(ImageEnhance.Color), _enhance_factor),
    'ColorIncreasing': _OpSpec(_enhance(ImageEnhance.Color), _enhance_factor_increasing),
    'Contrast': _OpSpec(_enhance(ImageEnhance.Contrast), _enhance_factor),
    'ContrastIncreasing': _OpSpec(_enhance(ImageEnhance.Contrast), _enhance_factor_increasing),
    'Brightness': _OpSpec(_enhance(ImageEnhance.Brightness), _enhance_factor),
    'BrightnessIncreasing': _OpSpec(_enhance(ImageEnhance.Brightness), _enhance_factor_increasing),
    'Sharpness': _OpSpec(_enhance(ImageEnhance.Sharpness), _enhance_factor),
    'SharpnessIncreasing': _OpSpec(_enhance(ImageEnhance.Sharpness), _enhance_factor_increasing),
    'ShearX': _OpSpec(shear_x, _shear_factor, geometric=True),
    'ShearY': _OpSpec(shear_y, _shear_factor, geometric=True),
    'TranslateXRel': _OpSpec(translate_x, _translate_fraction, geometric=True),
    'TranslateYRel': _OpSpec(translate_y, _translate_fraction, geometric=True),
}
OP_NAMES = tuple(_OPS)


class AugmentOp:
    """One named op, applied with probability ``prob`` at ``magnitude`` (0..10).

    ``magnitude_std`` > 0 draws each image's magnitude from a gaussian around it (inf: uniform in
    [0, magnitude]); the result is clipped to [0, magnitude_max]. Draws come from Python's ``random`` in
    timm's order, so a seeded run can be compared with timm's ``AugmentOp``.
    """

    def __init__(self, name, prob=0.5, magnitude=MAX_LEVEL, magnitude_std=0.0, magnitude_max=MAX_LEVEL,
                 fill=(128, 128, 128), resample=Image.Resampling.BICUBIC):
        if name not in _OPS:
            raise ValueError(f'unknown augment op {name!r}; known ops: {", ".join(OP_NAMES)}')
        self.name = name
        self.prob = prob
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.fill = tuple(fill)
        self.resample = resample

    def __call__(self, img):
        magnitude = self.sample_magnitude()
        return img if magnitude is None else self.apply(img, magnitude)

    def __repr__(self):
        return (f'{type(self).__name__}({self.name}, p={self.prob}, m={self.magnitude}, '
                f'mstd={self.magnitude_std}, mmax={self.magnitude_max})')

    def sample_magnitude(self) -> float | None:
        """This image's magnitude, or None when the op is skipped."""
        if self.prob < 1.0 and random.random() > self.prob:
            return None
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = random.uniform(0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = random.gauss(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, self.magnitude_max))

    def apply(self, img, magnitude: float):
        spec = _OPS[self.name]
        args = () if spec.level_to_arg is None else (spec.level_to_arg(magnitude),)
        if spec.geometric:
            return spec.image_fn(img, *args, fill=self.fill, resample=self.resample)
        return spec.image_fn(img, *args)


class RandAugment:
    """``num_layers`` ops drawn uniformly with replacement per image (numpy's generator, as timm), applied in
    order, each with its own probability."""

    def __init__(self, ops, num_layers=2):
        self.ops = list(ops)
        self.num_layers = num_layers

    def __call__(self, img):
        for op in self.choose_ops():
            img = op(img)
        return img

    def __repr__(self):
        return f'{type(self).__name__}(n={self.num_layers}, ops={self.ops})'

    def choose_ops(self):
        return [self.ops[i] for i in np.random.choice(len(self.ops), self.num_layers)]


class AutoAugment:
    """One sub-policy (a sequence of ops) drawn uniformly per image, its ops applied in order."""

    def __init__(self, policy):
        self.policy = [list(sub_policy) for sub_policy in policy]

    def __call__(self, img):
        for op in random.choice(self.policy):
            img = op(img)
        return img

    def __repr__(self):
        return f'{type(self).__name__}(policy={self.policy})'


RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
            'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_INCREASING = {'Posterize': 'PosterizeIncreasing', 'Solarize': 'SolarizeIncreasing', 'Color': 'ColorIncreasing',
               'Contrast': 'ContrastIncreasing', 'Brightness': 'BrightnessIncreasing',
               'Sharpness': 'SharpnessIncreasing'}
RAND_OPS_INCREASING = tuple(_INCREASING.get(name, name) for name in RAND_OPS)

# ImageNet policies as (op, probability, magnitude) pairs. 'original': the AutoAugment paper (arXiv 1805.09501);
# 'v0': the TPU EfficientNet policy. The 'r' variants swap in the posterize whose strength grows with magnitude.
_POLICY_ORIGINAL = (
    (('PosterizeOriginal', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
    (('PosterizeOriginal', 0.6, 7), ('PosterizeOriginal', 0.6, 6)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, 4), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, 7)),
    (('PosterizeOriginal', 0.8, 5), ('Equalize', 1.0, 2)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, 8), ('PosterizeOriginal', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, 2)),
    (('Equalize', 0.0, 7), ('Equalize', 0.8, 8)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, 8)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, 9)),
    (('Color', 0.4, 0), ('Equalize', 0.6, 3)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
)
_POLICY_V0 = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)),
    (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)),
    (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)),
    (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)),
    (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)),
    (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)),
    (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)),
    (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)),
    (('Rotate', 1.0, 7), ('TranslateYRel', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)),
    (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)),
    (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)),
    (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)),
    (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)


def _renamed(policy, renames):
    return tuple(tuple((renames.get(name, name), prob, level) for name, prob, level in sub) for sub in policy)


AUTO_AUGMENT_POLICIES = {
    'original': _POLICY_ORIGINAL,
    'originalr': _renamed(_POLICY_ORIGINAL, {'PosterizeOriginal': 'PosterizeIncreasing'}),
    'v0': _POLICY_V0,
    'v0r': _renamed(_POLICY_V0, {'Posterize': 'PosterizeIncreasing'}),
}


# ---------------------------------------------------------------------------------------------------------------
# timm's config strings: a name, then dash-separated sections of a key (letters) followed by its number.

_RAND_AUGMENT_KEYS = {'m': int, 'n': int, 'p': float, 'mstd': float, 'mmax': int, 'inc': int}
_AUTO_AUGMENT_KEYS = {'mstd': float}
_UNIFORM_MSTD_ABOVE = 100  # timm's convention: a larger mstd means uniform magnitude sampling


def _parse_sections(config_str: str, kind: str, keys: dict) -> tuple:
    """'rand-m9-mstd0.5' -> ('rand', {'m': 9, 'mstd': 0.5}), each value of the key's type."""
    head, *sections = config_str.split('-')
    values = {}
    for section in sections:
        match = re.fullmatch(r'([a-z]+)(\d.*)', section)
        if match is None or match.group(1) not in keys:
            raise ValueError(f'{kind} config {config_str!r}: unknown section {section!r}; '
                             f'known keys (each followed by a number): {", ".join(keys)}')
        key, text = match.groups()
        try:
            values[key] = keys[key](text)
        except ValueError:
            raise ValueError(f'{kind} config {config_str!r}: {key} needs an {keys[key].__name__}, '
                             f'got {text!r}') from None
    return head, values


def _magnitude_std(value: float) -> float:
    return math.inf if value > _UNIFORM_MSTD_ABOVE else value


def rand_augment_from_string(config_str: str, fill=(128, 128, 128),
                             resample=Image.Resampling.BICUBIC) -> RandAugment:
    """RandAugment from timm's grammar, e.g. 'rand-m9-mstd0.5-inc1'.

    Keys: m magnitude (int, default 10), n ops per image (2), p probability of each op (0.5), mstd magnitude
    noise std (0; above 100 means uniform in [0, m]), mmax magnitude clip (10), inc 1 for the op set whose
    strength grows with magnitude (0).
    """
    head, values = _parse_sections(config_str, 'RandAugment', _RAND_AUGMENT_KEYS)
    if head != 'rand':
        raise ValueError(f'RandAugment config {config_str!r} must start with "rand", got {head!r}')
    prob = values.get('p', 0.5)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f'RandAugment config {config_str!r}: p must lie in [0, 1], got {prob}')
    if values.get('mmax', 1) <= 0:
        raise ValueError(f'RandAugment config {config_str!r}: mmax must be positive, got {values["mmax"]}')
    names = RAND_OPS_INCREASING if values.get('inc', 0) else RAND_OPS
    ops = [AugmentOp(name, prob=prob, magnitude=values.get('m', MAX_LEVEL),
                     magnitude_std=_magnitude_std(values.get('mstd', 0.0)),
                     magnitude_max=values.get('mmax', MAX_LEVEL), fill=fill, resample=resample)
           for name in names]
    return RandAugment(ops, num_layers=values.get('n', 2))


def auto_augment_from_string(config_str: str, fill=(128, 128, 128),
                             resample=Image.Resampling.BICUBIC) -> AutoAugment:
    """AutoAugment from timm's grammar: a policy name ('original', 'originalr', 'v0', 'v0r'), optionally
    followed by '-mstd<std>' for magnitude noise, e.g. 'original-mstd0.5'."""
    name, values = _parse_sections(config_str, 'AutoAugment', _AUTO_AUGMENT_KEYS)
    if name not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f'unknown AutoAugment policy {name!r} in {config_str!r}; '
                         f'known policies: {", ".join(AUTO_AUGMENT_POLICIES)}')
    magnitude_std = _magnitude_std(values.get('mstd', 0.0))
    return AutoAugment([[AugmentOp(op, prob=prob, magnitude=level, magnitude_std=magnitude_std, fill=fill,
                                   resample=resample) for op, prob, level in sub_policy]
                        for sub_policy in AUTO_AUGMENT_POLICIES[name]])
