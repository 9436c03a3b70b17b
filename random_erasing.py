"""Random erasing (Zhong et al., arXiv 1708.04896) with timm's semantics, split like timm's prefetching loader:
the boxes are drawn per sample in the loader worker (``RandomErasing.draw``, a few integers that travel with the
uint8 image) and applied on the device to the normalised batch (``RandomErasing.apply``).

Erasing acts after normalisation, so a zero fill is the dataset mean colour and the random fills are
standard-normal like the normalised pixels around them. The random fills come from a counter-based generator
(``standard_normal``): a box's noise is a function of its seed and the pixel position alone, so it is the same on
any device, in any batch, with any number of loader workers.
"""
import math
import random

import numpy as np
import paddle

from config import RANDOM_ERASE_MODES

_TRIES_PER_BOX = 10  # a box that does not fit in this many draws is dropped
BOX_FIELDS = ('top', 'left', 'height', 'width', 'seed')  # one row of a sample's erase parameters
_SEED_LIMIT = 2 ** 31
# A 32-bit integer mixer: xorshift, multiply, xorshift, multiply, xorshift (the constants of one of Wellons'
# hash-prospector functions). Multipliers below 2^31 keep every product of a 32-bit value inside int64.
_MIXER = ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, None))
UNIFORM_BITS = 23  # of a hash, per standard-normal value (normal_from_bits)


def _constant(value: int) -> paddle.Tensor:
    return paddle.full([], value, dtype='int64')


def hash32(x: paddle.Tensor) -> paddle.Tensor:
    """The mixer on int64 tensors holding values in [0, 2^32), elementwise; bit operations only, no division."""
    low_word = _constant(2 ** 32 - 1)
    for shift, multiplier in _MIXER:
        x = paddle.bitwise_xor(x, paddle.bitwise_right_shift(x, _constant(shift)))
        if multiplier is not None:
            x = paddle.bitwise_and(x * multiplier, low_word)
    return x


def standard_normal(seeds: paddle.Tensor, counters: paddle.Tensor) -> paddle.Tensor:
    """float32 standard-normal values, one per (seed, counter) pair (broadcast; int64 seeds in [0, 2^31),
    counters in [0, 2^32)): the top UNIFORM_BITS bits of hash32(hash32(seed) ^ counter) give them. The same pair
    gives the same value on every device."""
    bits = paddle.bitwise_right_shift(hash32(paddle.bitwise_xor(hash32(seeds), counters)),
                                      _constant(32 - UNIFORM_BITS))
    return normal_from_bits(bits)


def normal_from_bits(bits: paddle.Tensor) -> paddle.Tensor:
    """sqrt(2) erfinv(2u - 1) with u = (bits + 0.5) / 2^UNIFORM_BITS, uniform in (0, 1) for bits in
    [0, 2^UNIFORM_BITS). With 23 bits every u and 2u - 1 is exact in float32 and |2u - 1| <= 1 - 2^-23, so every
    value is finite (|values| < 5.3); with 24 bits the largest u rounds to 1.0 and erfinv gives inf."""
    uniform = (bits.astype('float32') + 0.5) / 2 ** UNIFORM_BITS
    return math.sqrt(2) * paddle.erfinv(2 * uniform - 1)


class RandomErasing:
    """Erase random boxes of images: ``draw`` the boxes of one image in the loader worker, ``apply`` them to a
    normalised NCHW batch on the device.

    With ``probability`` an image gets a box count uniform in [min_count, max_count]; each box takes an area
    uniform in ``area_range`` (fractions of the image, divided by the count) and an aspect ratio (h / w)
    log-uniform in ``aspect_range``. Fill per mode: 'const' 0, 'rand' one standard-normal value per channel and
    box, 'pixel' standard-normal noise per pixel. Box geometry draws from Python's ``random`` in timm's order (so
    seeded runs can be compared with timm box for box), each box's noise seed from numpy's global generator: the
    dataset seeds both per sample.

    ``num_splits`` > 1 leaves the first batch_size // num_splits images of a batch untouched (the clean part
    of split augmentation), as timm's prefetching loader does.
    """

    def __init__(self, probability=0.5, mode='const', min_count=1, max_count=None, area_range=(0.02, 1 / 3),
                 aspect_range=(0.3, 1 / 0.3), num_splits=0):
        if mode not in RANDOM_ERASE_MODES:
            raise ValueError(f'RandomErasing mode must be one of {list(RANDOM_ERASE_MODES)}, got {mode!r}')
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f'RandomErasing probability must lie in [0, 1], got {probability!r}')
        max_count = min_count if max_count is None else max_count
        if not 1 <= min_count <= max_count:
            raise ValueError(f'RandomErasing needs 1 <= min_count <= max_count, got {min_count}, {max_count}')
        if not 0.0 < area_range[0] <= area_range[1]:
            raise ValueError(f'RandomErasing area_range must be (min, max) with 0 < min <= max, got {area_range}')
        if not 0.0 < aspect_range[0] <= aspect_range[1]:
            raise ValueError(f'RandomErasing aspect_range must be (min, max) with 0 < min <= max, got {aspect_range}')
        self.probability = probability
        self.mode = mode
        self.min_count = min_count
        self.max_count = max_count
        self.area_range = tuple(area_range)
        self.log_aspect_range = (math.log(aspect_range[0]), math.log(aspect_range[1]))
        self.num_splits = num_splits

    def __repr__(self):
        return (f'{type(self).__name__}(probability={self.probability}, mode={self.mode!r}, '
                f'count=({self.min_count}, {self.max_count}), num_splits={self.num_splits})')

    @property
    def boxes_nbytes(self) -> int:
        """What one image's ``draw`` weighs."""
        return self.max_count * len(BOX_FIELDS) * np.dtype(np.int64).itemsize

    def draw(self, height: int, width: int) -> np.ndarray:
        """int64 [max_count, 5]: (top, left, height, width, noise seed) of each box of one image; a row of height
        0 is no box (the image was not picked, it got fewer boxes, or a box did not fit). Every row of a picked
        image has a seed: 'pixel' noise uses the first row's, 'rand' each box its own."""
        boxes = np.zeros((self.max_count, len(BOX_FIELDS)), dtype=np.int64)
        if random.random() > self.probability:
            return boxes
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count,
                                                                                       self.max_count)
        for row in range(count):
            box = self._sample_box(height, width, count)
            if box is not None:
                boxes[row, :4] = box
        boxes[:, 4] = np.random.randint(_SEED_LIMIT, size=self.max_count)
        return boxes

    def _sample_box(self, height: int, width: int, count: int):
        """(top, left, h, w) of a box strictly smaller than the image, or None if none fitted."""
        for _ in range(_TRIES_PER_BOX):
            area = random.uniform(*self.area_range) * height * width / count
            aspect = math.exp(random.uniform(*self.log_aspect_range))
            box_h = round(math.sqrt(area * aspect))
            box_w = round(math.sqrt(area / aspect))
            if box_w < width and box_h < height:
                return random.randint(0, height - box_h), random.randint(0, width - box_w), box_h, box_w
        return None

    def apply(self, images: paddle.Tensor, boxes: paddle.Tensor) -> paddle.Tensor:
        """``images`` (float NCHW) with the boxes of ``boxes`` (int64 [N, max_count, 5], rows of ``draw``)
        filled, later boxes over earlier ones; no host sync, no data-dependent shape. 'pixel' noise is one field
        per image (seeded by its first row) shown through every box: each erased pixel is a fresh normal value
        however the boxes overlap, as in timm."""
        if images.ndim != 4 or boxes.ndim != 3 or boxes.shape[0] != images.shape[0] \
                or boxes.shape[2] != len(BOX_FIELDS):
            raise ValueError(f'RandomErasing.apply expects NCHW images and [N, count, {len(BOX_FIELDS)}] boxes, '
                             f'got shapes {list(images.shape)} and {list(boxes.shape)}')
        insides = self._box_masks(images.shape, boxes)
        batch, channels, height, width = images.shape
        if self.mode == 'pixel':
            counters = paddle.arange(channels * height * width, dtype='int64').reshape([1, channels, height, width])
            noise = standard_normal(boxes[:, 0, 4].reshape([batch, 1, 1, 1]), counters).astype(images.dtype)
            return paddle.where(paddle.any(paddle.stack(insides), axis=0).unsqueeze(1), noise, images)
        for row, inside in enumerate(insides):
            if self.mode == 'rand':
                seeds = boxes[:, row, 4].reshape([batch, 1, 1, 1])
                fill = standard_normal(seeds, paddle.arange(channels, dtype='int64').reshape([1, channels, 1, 1]))
            else:
                fill = paddle.zeros([1, channels, 1, 1], dtype='float32')
            images = paddle.where(inside.unsqueeze(1), fill.astype(images.dtype), images)
        return images

    def _box_masks(self, shape, boxes: paddle.Tensor) -> list[paddle.Tensor]:
        """bool [N, H, W] per box row: the pixels it covers (none in the clean split of ``num_splits``)."""
        batch, _, height, width = shape
        rows = paddle.arange(height, dtype='int64').reshape([1, height, 1])
        cols = paddle.arange(width, dtype='int64').reshape([1, 1, width])
        first = batch // self.num_splits if self.num_splits > 1 else 0
        erasable = (paddle.arange(batch, dtype='int64') >= first).reshape([batch, 1, 1])
        masks = []
        for row in range(boxes.shape[1]):
            top, left, box_h, box_w = (boxes[:, row, field].reshape([batch, 1, 1]) for field in range(4))
            masks.append((rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w) & erasable)
        return masks
