"""The device half of the input pipeline, as in timm's prefetching loader: loader workers send uint8 images (a
quarter of float32's bytes through shared memory and over the bus) and the batch is normalised, and
random-erased with the boxes the workers drew, on the device right after it arrives.

``get_dataloader`` (datasets.py) applies a dataset's ``on_device`` to each batch it yields, so objectives and the
engine receive float32 batches as before.
"""
from collections.abc import Callable

import paddle

from random_erasing import RandomErasing
from transforms import map_pixels

PIXEL_SCALE = 255.0


class NormaliseAndErase:
    """uint8 NCHW images -> float32 (x / 255 - mean) / std, the float ops of the host pipeline it replaces in
    the same order (so the same bits); then ``erasing`` applies the boxes shipped with the batch, if any."""

    def __init__(self, mean, std, erasing: RandomErasing | None = None):
        self.mean = [float(value) for value in mean]
        self.std = [float(value) for value in std]
        self.erasing = erasing
        self._constants = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_constants': {}}  # device tensors stay in the process that made them

    def _mean_and_std(self, place) -> tuple[paddle.Tensor, paddle.Tensor]:
        """mean and std as [1, C, 1, 1] tensors on ``place``, copied there once (a copy per batch would be a
        host-to-device transfer, a stall on a GPU)."""
        key = str(place)
        if key not in self._constants:
            self._constants[key] = tuple(paddle.to_tensor(values, dtype='float32', place=place).reshape([1, -1, 1, 1])
                                         for values in (self.mean, self.std))
        return self._constants[key]

    def __call__(self, images: paddle.Tensor, boxes: paddle.Tensor | None = None) -> paddle.Tensor:
        if images.dtype != paddle.uint8:
            raise TypeError(f'NormaliseAndErase expects uint8 images from the loader, got {images.dtype}')
        mean, std = self._mean_and_std(images.place)
        normalised = (images.astype('float32') / PIXEL_SCALE - mean) / std
        if self.erasing is None:
            return normalised
        if boxes is None:
            raise ValueError('random erasing is on but the batch carries no erase boxes')
        return self.erasing.apply(normalised, boxes)

    @classmethod
    def from_config(cls, config, erasing: RandomErasing | None = None) -> 'NormaliseAndErase':
        return cls(config.DATA.IMAGENET_MEAN, config.DATA.IMAGENET_STD, erasing)


def tokenizer_input(images: paddle.Tensor) -> paddle.Tensor:
    """uint8 NCHW tokenizer views -> float32 in the DALL-E tokenizer's range (x / 255, then map_pixels)."""
    return map_pixels(unit_pixels(images))


def unit_pixels(images: paddle.Tensor) -> paddle.Tensor:
    """uint8 NCHW tokenizer views -> float32 in [0, 1] (x / 255, ToTensor's scaling): the VQ-KD tokenizer's input,
    as unilm's beit2 feeds it (not normalised, not map_pixels'd)."""
    return images.astype('float32') / PIXEL_SCALE


TOKENIZER_INPUTS = {'dalle': tokenizer_input, 'vqkd': unit_pixels}  # by PRETRAIN.TOKENIZER


class ClassificationBatch:
    """A loader batch [uint8 images, labels(, erase boxes)] -> [float32 images, labels]: what objectives take."""

    def __init__(self, normalise: NormaliseAndErase):
        self.normalise = normalise

    def __call__(self, batch: list) -> list:
        if self.normalise.erasing is None:
            images, labels, *rest = batch
            return [self.normalise(images), labels, *rest]
        images, labels, boxes, *rest = batch
        return [self.normalise(images, boxes), labels, *rest]


class PretrainingBatch:
    """A loader batch [uint8 patch views, uint8 tokenizer views, ...] -> [float32 normalised patch views, float32
    tokenizer input (``to_tokenizer_input``, one of TOKENIZER_INPUTS), ...]; the other fields (the masks) pass as
    they are."""

    def __init__(self, normalise: NormaliseAndErase, to_tokenizer_input: Callable = tokenizer_input):
        self.normalise = normalise
        self.to_tokenizer_input = to_tokenizer_input

    def __call__(self, batch: list) -> list:
        patch_views, tokenizer_views, *rest = batch
        return [self.normalise(patch_views), self.to_tokenizer_input(tokenizer_views), *rest]
