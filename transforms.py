"""Image pipelines for BEiT fine-tuning, with timm's semantics, and the two-view pipeline of pre-training.

The pipelines run in the DataLoader workers: they take a PIL image of any mode and return a uint8 CHW numpy
array, a quarter of float32's bytes through shared memory and over the bus. Normalisation (DATA.IMAGENET_MEAN /
STD) and random erasing happen on the device after the transfer (device_batch.py), as in timm's prefetching
loader; ``host_normalise`` gives the same float32 values on the host, for prediction and for tests. Paddle's vision
transforms do the crops, flips, resizes and colour jitter; RandAugment and AutoAugment come from auto_augment.py.
``get_pretrain_transforms`` returns the pair (patch view, tokenizer view) of one random crop, as unilm's
pre-training does; ``get_linear_probe_transforms`` the crop-and-flip pipeline of unilm's linear probing.
"""
import math
from collections.abc import Callable

import numpy as np
from paddle.vision import transforms as T
from paddle.vision.transforms import functional as F
from PIL import Image

from auto_augment import auto_augment_from_string, rand_augment_from_string
from config import INTERPOLATIONS
from paddle_internals import random_resized_crop_box
from random_erasing import RandomErasing

_PIL_FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


LOGIT_LAPLACE_EPS = 0.1  # the DALL-E dVAE's pixel margin


def map_pixels(x, eps: float = LOGIT_LAPLACE_EPS):
    """Pixels in [0, 1] into [eps, 1 - eps], the range the DALL-E tokenizer was trained on (arrays or tensors)."""
    return (1 - 2 * eps) * x + eps


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, the one layout the pipelines handle.

    PIL's ``convert('RGB')`` does it, as in timm's image loader: alpha is dropped (the stored colour under
    transparent pixels is kept), palettes are expanded, grey is copied to three channels, CMYK is converted.
    16-bit grey (I;16*, and I, which older Pillow used for 16-bit PNGs) is the exception: PIL clips it at 255,
    which turns most such images white, so it is scaled to 8 bits (v / 257, rounded) first.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f'expected a PIL image, got {type(img).__name__}')
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(img), 0, 65535) / 257.0
        img = Image.fromarray(np.rint(grey).astype(np.uint8))
    return img if img.mode == 'RGB' else img.convert('RGB')


def to_chw_uint8(img: Image.Image) -> np.ndarray:
    """RGB image as a contiguous CHW uint8 array: what a loader worker sends."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1], the input Normalize expects."""
    return pixels.astype(np.float32) / 255


def host_normalise(config) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 CHW (or NCHW) -> float32 normalised with DATA.IMAGENET_MEAN / STD, on the host: the values
    device_batch.NormaliseAndErase computes on the device."""
    return T.Compose([to_float, T.Normalize(mean=list(config.DATA.IMAGENET_MEAN), std=list(config.DATA.IMAGENET_STD))])


def image_mean_fill(mean) -> tuple:
    """The dataset mean as an 8-bit RGB colour: what geometric augment ops fill uncovered pixels with."""
    return tuple(min(255, round(255 * value)) for value in mean)


def _from_config_key(key: str, build: Callable, *args, **kwargs):
    """build(*args, **kwargs), naming the config key in any error."""
    try:
        return build(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f'{key}: {err}') from err


def _colour_augmentation(config) -> list:
    """RandAugment, AutoAugment or colour jitter: timm turns jitter off when either augment policy is on."""
    train = config.TRAIN
    if train.RAND_AUGMENT and train.AUTO_AUGMENT:
        raise ValueError('TRAIN.RAND_AUGMENT and TRAIN.AUTO_AUGMENT are both on; choose one')
    style = {'fill': image_mean_fill(config.DATA.IMAGENET_MEAN), 'resample': _PIL_FILTERS[config.DATA.INTERPOLATION]}
    if train.RAND_AUGMENT:
        return [_from_config_key('TRAIN.RAND_AUGMENT_CONFIG', rand_augment_from_string, train.RAND_AUGMENT_CONFIG,
                                 **style)]
    if train.AUTO_AUGMENT:
        return [_from_config_key('TRAIN.AUTO_AUGMENT_POLICY', auto_augment_from_string, train.AUTO_AUGMENT_POLICY,
                                 **style)]
    if train.COLOR_JITTER > 0:
        return [T.ColorJitter(train.COLOR_JITTER, train.COLOR_JITTER, train.COLOR_JITTER)]
    return []


def _crop_and_flip(config) -> list:
    """RGB, random resized crop to DATA.IMAGE_SIZE (TRAIN.RRC_SCALE, RRC_RATIO), horizontal flip (HFLIP_PROB)."""
    train = config.TRAIN
    steps = [to_rgb, T.RandomResizedCrop(config.DATA.IMAGE_SIZE, scale=tuple(train.RRC_SCALE),
                                         ratio=tuple(train.RRC_RATIO), interpolation=config.DATA.INTERPOLATION)]
    if train.HFLIP_PROB > 0:
        steps.append(T.RandomHorizontalFlip(train.HFLIP_PROB))
    return steps


def get_train_transforms(config) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> uint8 CHW array: random resized crop, flip, colour augmentation. Random erasing follows
    on the device (``get_train_erasing``)."""
    return T.Compose(_crop_and_flip(config) + _colour_augmentation(config) + [to_chw_uint8])


def get_train_erasing(config) -> RandomErasing | None:
    """The random erasing of the fine-tuning train pipeline (TRAIN.RANDOM_ERASE_*), None when it is off."""
    train = config.TRAIN
    if train.RANDOM_ERASE_PROB <= 0:
        return None
    return _from_config_key('TRAIN.RANDOM_ERASE_COUNT', RandomErasing, train.RANDOM_ERASE_PROB,
                            mode=train.RANDOM_ERASE_MODE, max_count=train.RANDOM_ERASE_COUNT,
                            num_splits=2 if train.RANDOM_ERASE_SPLIT else 0)


def get_linear_probe_transforms(config) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> uint8 CHW array for training a linear probe: random resized crop, flip, and no other
    augmentation (unilm's run_linear_eval.py)."""
    return T.Compose([*_crop_and_flip(config), to_chw_uint8])


def get_val_transforms(config) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> uint8 CHW array: short side to floor(size / crop_pct), center crop."""
    if config.DATA.CROP_PCT <= 0:
        raise ValueError(f'DATA.CROP_PCT must be in (0, 1], got {config.DATA.CROP_PCT}')
    size = config.DATA.IMAGE_SIZE
    steps = [to_rgb, T.Resize(math.floor(size / config.DATA.CROP_PCT), interpolation=config.DATA.INTERPOLATION),
             T.CenterCrop(size)]
    return T.Compose([*steps, to_chw_uint8])


class TwoViewResizedCrop(T.RandomResizedCrop):
    """One random box (RandomResizedCrop's draw), resized twice: to ``size`` with ``interpolation`` for the
    patches and to ``second_size`` with ``second_interpolation`` for the tokenizer. Returns the two PIL images."""

    def __init__(self, size: int, second_size: int, scale, ratio, interpolation: str, second_interpolation: str):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)
        self.second_size = (second_size, second_size)
        self.second_interpolation = second_interpolation

    def _apply_image(self, img: Image.Image) -> tuple[Image.Image, Image.Image]:
        box = F.crop(img, *random_resized_crop_box(self, img))
        return (F.resize(box, self.size, self.interpolation),
                F.resize(box, self.second_size, self.second_interpolation))


class TwoViewTransform:
    """PIL image -> (patch view, tokenizer view): the shared steps, then each view's own."""

    def __init__(self, shared: Callable, first: Callable, second: Callable):
        self.shared = shared
        self.first = first
        self.second = second

    def __call__(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        patch_view, tokenizer_view = self.shared(img)
        return self.first(patch_view), self.second(tokenizer_view)


def get_pretrain_transforms(config) -> TwoViewTransform:
    """unilm's pre-training pipeline: colour augmentation and flip of the whole image, one random resized crop
    seen at DATA.IMAGE_SIZE (DATA.INTERPOLATION) and at PRETRAIN.SECOND_INPUT_SIZE (PRETRAIN.SECOND_INTERPOLATION),
    both uint8 CHW; on the device the first is normalised, the second scaled to [0, 1] and, for the DALL-E
    tokenizer only, map_pixels'd: the tokenizer's input range (device_batch.PretrainingBatch, TOKENIZER_INPUTS)."""
    train = config.TRAIN
    steps = [to_rgb, *_colour_augmentation(config)]
    if train.HFLIP_PROB > 0:
        steps.append(T.RandomHorizontalFlip(train.HFLIP_PROB))
    steps.append(TwoViewResizedCrop(config.DATA.IMAGE_SIZE, config.PRETRAIN.SECOND_INPUT_SIZE,
                                    scale=tuple(train.RRC_SCALE), ratio=tuple(train.RRC_RATIO),
                                    interpolation=config.DATA.INTERPOLATION,
                                    second_interpolation=config.PRETRAIN.SECOND_INTERPOLATION))
    return TwoViewTransform(T.Compose(steps), to_chw_uint8, to_chw_uint8)
