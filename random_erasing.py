"""Random erasing (Zhong et al., arXiv 1708.04896) of normalised float images, with timm's semantics.

It runs after normalisation, so a zero fill is the dataset mean colour and the random fills are standard-normal
like the normalised pixels around them.
"""
import math
import random

import numpy as np

from config import RANDOM_ERASE_MODES

_TRIES_PER_BOX = 10  # a box that does not fit in this many draws is dropped


class RandomErasing:
    """Erase random boxes of a CHW float array, or of each image of an NCHW batch, in place; returns the array.

    With ``probability`` an image gets a box count uniform in [min_count, max_count]; each box takes an area
    uniform in ``area_range`` (fractions of the image, divided by the count) and an aspect ratio (h / w)
    log-uniform in ``aspect_range``. Fill per mode: 'const' 0, 'rand' one standard-normal value per channel and
    box, 'pixel' standard-normal noise per pixel. Box geometry draws from Python's ``random`` in timm's order
    (so seeded runs can be compared with timm box for box) and fills from numpy's global generator; Paddle's
    DataLoader seeds both in every worker.

    ``num_splits`` > 1 leaves the first batch_size // num_splits images of a batch untouched (the clean part
    of split augmentation); a single image ignores it, as in timm.
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

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.ndim == 3:
            self._erase(images)
        elif images.ndim == 4:
            first = len(images) // self.num_splits if self.num_splits > 1 else 0
            for image in images[first:]:
                self._erase(image)
        else:
            raise ValueError(f'RandomErasing expects a CHW image or an NCHW batch, got shape {images.shape}')
        return images

    def __repr__(self):
        return (f'{type(self).__name__}(probability={self.probability}, mode={self.mode!r}, '
                f'count=({self.min_count}, {self.max_count}), num_splits={self.num_splits})')

    def _erase(self, image: np.ndarray) -> None:
        if random.random() > self.probability:
            return
        count = self.min_count if self.min_count == self.max_count else random.randint(self.min_count,
                                                                                       self.max_count)
        channels, height, width = image.shape
        for _ in range(count):
            box = self._sample_box(height, width, count)
            if box is not None:
                top, left, box_h, box_w = box
                image[:, top:top + box_h, left:left + box_w] = self._fill((channels, box_h, box_w), image.dtype)

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

    def _fill(self, shape, dtype) -> np.ndarray:
        if self.mode == 'pixel':
            return np.random.standard_normal(shape).astype(dtype)
        per_channel = (shape[0], 1, 1)
        if self.mode == 'rand':
            return np.random.standard_normal(per_channel).astype(dtype)
        return np.zeros(per_channel, dtype=dtype)
