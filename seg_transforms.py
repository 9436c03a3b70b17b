"""Segmentation pipelines with the semantics of mmseg 0.11 as unilm's ADE20K configs use them, in numpy (OpenCV,
which mmcv calls, is not a dependency here).

Training: Resize keeping the ratio to SEG.IMG_SCALE times r, r uniform in SEG.RATIO_RANGE (image bilinear, label
nearest); RandomCrop DATA.IMAGE_SIZE with SEG.CAT_MAX_RATIO; RandomFlip SEG.FLIP_PROB; PhotoMetricDistortion;
Normalize (DATA.IMAGENET_MEAN / STD); Pad to DATA.IMAGE_SIZE (image 0 after normalisation, label IGNORE_INDEX).
Evaluation: Resize keeping the ratio to SEG.IMG_SCALE, Normalize; the label stays at the original size.

Every random draw comes from the ``rng`` argument (a ``numpy.random.RandomState``) in mmseg's order with mmseg's
calls, so one seeded generator gives one sample. Images are uint8 RGB HWC until normalised; mmseg works on BGR,
which changes nothing here (every step treats the channels alike, and its HSV conversion is the BGR one).

Outputs are float32 CHW images, not the uint8 that classification sends (device_batch.py): mmseg pads after
normalising, so padded pixels are 0 in normalised units, which a device-side normalisation of uint8 pixels would
turn into -mean / std. Labels are int64 HW.

Known difference from mmcv: OpenCV resizes uint8 images in 11-bit fixed point; here the same sample positions and
weights are applied in float32 and rounded half up, so a resized pixel may differ from OpenCV's by one grey level.
"""
from collections.abc import Sequence

import numpy as np

# ---- geometry ---------------------------------------------------------------------------------------------------


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for a (long, short) target: the largest keep-ratio size within it, (w, h) each
    rounded as ``int(x * factor + 0.5)`` with factor = min(long / long side, short / short side)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR sample positions along one axis: (first index, second index, second weight).

    Position (i + 0.5) * source / target - 0.5; left of the first pixel centre and right of the last one the
    edge pixel is taken alone (weight 0 on the other)."""
    position = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    first = np.floor(position).astype(np.int64)
    weight = (position - first).astype(np.float32)
    outside = (first < 0) | (first >= source - 1)
    weight[outside] = 0.0
    first = np.clip(first, 0, source - 1)
    return first, np.minimum(first + 1, source - 1), weight


def resize_bilinear(image: np.ndarray, width: int, height: int, box: Sequence[int] | None = None) -> np.ndarray:
    """uint8 HWC (or HW) image resized as OpenCV's INTER_LINEAR samples it (no antialiasing when shrinking).

    ``box`` (y1, y2, x1, x2): only that part of the resized image, computed alone (each output pixel depends on
    its own position only), so the training pipeline need not resize what its crop drops."""
    y_slice, x_slice = (slice(None), slice(None)) if box is None else (slice(*box[:2]), slice(*box[2:]))
    x0, x1, wx = (taps[x_slice] for taps in _linear_taps(image.shape[1], width))
    y0, y1, wy = (taps[y_slice] for taps in _linear_taps(image.shape[0], height))
    extra = (1,) * (image.ndim - 2)
    pixels = image.astype(np.float32)
    wx = wx.reshape(1, -1, *extra)
    rows = pixels[:, x0] * (1 - wx) + pixels[:, x1] * wx
    wy = wy.reshape(-1, 1, *extra)
    out = rows[y0] * (1 - wy) + rows[y1] * wy
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, width: int, height: int) -> np.ndarray:
    """HW label map resized as OpenCV's INTER_NEAREST: output pixel i takes source floor(i * source / target)."""
    def indices(source: int, target: int) -> np.ndarray:
        step = 1.0 / (target / source)  # OpenCV's ifx = 1 / inv_scale_x, in double
        return np.minimum(np.floor(np.arange(target) * step).astype(np.int64), source - 1)
    return label[indices(label.shape[0], height)][:, indices(label.shape[1], width)]


def rescale(image: np.ndarray, label: np.ndarray | None, scale: Sequence[int]):
    """mmseg's keep-ratio Resize to ``scale`` (long, short): the image bilinear, the label (if any) nearest."""
    width, height = rescale_size(image.shape[1], image.shape[0], scale)
    resized = resize_bilinear(image, width, height)
    return resized, None if label is None else resize_nearest(label, width, height)


def random_scale(img_scale: Sequence[int], ratio_range: Sequence[float], rng) -> tuple[int, int]:
    """mmseg's ``random_sample_ratio``: r = min + random_sample() * (max - min); (int(long * r), int(short * r))."""
    low, high = ratio_range
    ratio = rng.random_sample() * (high - low) + low
    return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def crop_box(shape: Sequence[int], crop: Sequence[int], rng) -> tuple[int, int, int, int]:
    """mmseg's ``get_crop_bbox``: (y1, y2, x1, x2), offsets randint(0, margin + 1), the top one drawn first."""
    top = rng.randint(0, max(shape[0] - crop[0], 0) + 1)
    left = rng.randint(0, max(shape[1] - crop[1], 0) + 1)
    return top, top + crop[0], left, left + crop[1]


CROP_TRIES = 10


def crop_is_balanced(label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's acceptance rule: at least two non-ignored classes, the largest under ``cat_max_ratio`` of the
    non-ignored pixels (label values are non-negative)."""
    counts = np.bincount(label.ravel(), minlength=ignore_index + 1)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(label: np.ndarray, crop: Sequence[int], cat_max_ratio: float, ignore_index: int,
                    rng) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop box (y1, y2, x1, x2) on the resized label: with ``cat_max_ratio`` < 1 a box is checked up
    to CROP_TRIES times and redrawn after each failure, so after ten failures the eleventh box is used unchecked. A
    side shorter than the crop is kept whole (slicing stops at the edge; Pad fills the rest)."""
    box = crop_box(label.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            if crop_is_balanced(label[box[0]:box[1], box[2]:box[3]], cat_max_ratio, ignore_index):
                break
            box = crop_box(label.shape, crop, rng)
    return box


def random_flip(image: np.ndarray, label: np.ndarray, prob: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """mmseg's RandomFlip, horizontal: flipped when rand() < prob (one draw whatever prob)."""
    if rng.rand() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def pad_to(image: np.ndarray, label: np.ndarray, size: Sequence[int], ignore_index: int):
    """mmseg's Pad to a fixed (h, w): bottom and right; CHW float image with 0, label with ``ignore_index``."""
    height, width = size
    padded = np.zeros((image.shape[0], height, width), dtype=image.dtype)
    padded[:, :image.shape[1], :image.shape[2]] = image
    padded_label = np.full((height, width), ignore_index, dtype=label.dtype)
    padded_label[:label.shape[0], :label.shape[1]] = label
    return padded, padded_label


# ---- colour: OpenCV's 8-bit HSV (H in [0, 180), S and V in [0, 255]), as cv2.cvtColor computes it on uint8 ---------

_HSV_SHIFT = 12
_SATURATION_DIVISORS = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int32)
_HUE_DIVISORS = np.array([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=np.int32)
_HALF = 1 << (_HSV_SHIFT - 1)
# which of (v, v(1-s), v(1-sf), v(1-s(1-f))) R, G and B take in each 60-degree sector (OpenCV's sector table)
_SECTOR_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV with OpenCV's integer arithmetic (tables of 2^12-scaled reciprocals, rounded):
    V = max, S = round(255 (V - min) / V), H = round(30 * (sector offset) / (V - min)) in units of 2 degrees."""
    r, g, b = (image[..., i].astype(np.int32) for i in range(3))  # products stay below 2^31
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    hsv = np.empty(image.shape, np.uint8)
    hsv[..., 1] = (diff * _SATURATION_DIVISORS[v] + _HALF) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HUE_DIVISORS[diff] + _HALF) >> _HSV_SHIFT
    h[h < 0] += 180
    hsv[..., 0], hsv[..., 2] = h, v
    return hsv


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV's ranges) -> uint8 RGB as OpenCV computes it: float32 S and V in [0, 1], the sector
    formulas, then round(x * 255) to the nearest (ties to even)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180)
    s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255)
    v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255)
    h = np.mod(h, np.float32(6))  # OpenCV wraps hues past 180
    floor = np.floor(h)
    sector, f = floor.astype(np.intp), h - floor  # f in float32, as OpenCV computes it
    one = np.float32(1)
    # all four are v when s is 0: OpenCV's grey case needs no branch
    table = np.stack([v, v * (one - s), v * (one - s * f), v * (one - s * (one - f))], axis=-1)
    rgb = table.take(_SECTOR_RGB[sector] + 4 * np.arange(sector.size).reshape(sector.shape)[..., None])
    return np.rint(rgb * np.float32(255)).clip(0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion on uint8 images; each step happens with probability 0.5 (randint(2)):
    brightness + uniform(-delta, delta); mode = randint(2): mode 1 applies contrast x uniform(range) here, mode 0
    after the HSV steps; saturation x uniform(range) on S; hue + randint(-delta, delta) (numpy's upper bound is
    exclusive: -18..17) on H modulo 180. Each arithmetic step is float32, clipped to [0, 255], truncated to uint8."""

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = int(hue_delta)

    @staticmethod
    def convert(pixels: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(pixels.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)

    def brightness(self, image: np.ndarray, rng) -> np.ndarray:
        if rng.randint(2):
            return self.convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        return image

    def contrast(self, image: np.ndarray, rng) -> np.ndarray:
        if rng.randint(2):
            return self.convert(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def saturation(self, image: np.ndarray, rng) -> np.ndarray:
        if rng.randint(2):
            hsv = rgb_to_hsv(image)
            hsv[..., 1] = self.convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            return hsv_to_rgb(hsv)
        return image

    def hue(self, image: np.ndarray, rng) -> np.ndarray:
        if rng.randint(2):
            hsv = rgb_to_hsv(image)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randint(-self.hue_delta, self.hue_delta)) % 180
            return hsv_to_rgb(hsv)
        return image

    def __call__(self, image: np.ndarray, rng) -> np.ndarray:
        image = self.brightness(image, rng)
        mode = rng.randint(2)
        if mode == 1:
            image = self.contrast(image, rng)
        image = self.hue(self.saturation(image, rng), rng)
        if mode == 0:
            image = self.contrast(image, rng)
        return image


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB HWC -> float32 CHW (x - 255 mean) / (255 std), mmcv's imnormalize with mean and std in [0, 1]
    units (unilm's 123.675 ... are ImageNet's 0.485 ... times 255)."""
    scaled_mean = (255 * np.asarray(mean, dtype=np.float64)).astype(np.float32)
    inverse_std = (1 / (255 * np.asarray(std, dtype=np.float64))).astype(np.float32)
    return np.ascontiguousarray(((image.astype(np.float32) - scaled_mean) * inverse_std).transpose(2, 0, 1))


# ---- the pipelines ----------------------------------------------------------------------------------------------


class SegTrainTransform:
    """(uint8 RGB HWC image, uint8 HW label, rng) -> (float32 CHW image, int64 HW label), both crop-sized.

    The same as mmseg's Resize then RandomCrop, but the image is resized within the chosen box only (the box is
    drawn on the resized label, which is cheap to resize whole)."""

    def __init__(self, *, crop_size: int, img_scale: Sequence[int], ratio_range: Sequence[float],
                 cat_max_ratio: float, flip_prob: float, distortion: PhotoMetricDistortion, mean: Sequence[float],
                 std: Sequence[float], ignore_index: int):
        self.crop = (crop_size, crop_size)
        self.img_scale, self.ratio_range = tuple(img_scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob = cat_max_ratio, flip_prob
        self.distortion, self.mean, self.std, self.ignore_index = distortion, mean, std, ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        width, height = rescale_size(image.shape[1], image.shape[0],
                                     random_scale(self.img_scale, self.ratio_range, rng))
        label = resize_nearest(label, width, height)
        box = random_crop_box(label, self.crop, self.cat_max_ratio, self.ignore_index, rng)
        image, label = resize_bilinear(image, width, height, box), label[box[0]:box[1], box[2]:box[3]]
        image, label = random_flip(image, label, self.flip_prob, rng)
        image = self.distortion(np.ascontiguousarray(image), rng)
        image, label = pad_to(normalise(image, self.mean, self.std), label, self.crop, self.ignore_index)
        return image, label.astype(np.int64)


class SegEvalTransform:
    """(uint8 RGB HWC image, uint8 HW label, rng unused) -> (float32 CHW image resized keeping the ratio to
    ``img_scale``, int64 HW label at the original size: the size the logits are resized back to)."""

    def __init__(self, *, img_scale: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.img_scale, self.mean, self.std = tuple(img_scale), mean, std

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        resized, _ = rescale(image, None, self.img_scale)
        return normalise(resized, self.mean, self.std), label.astype(np.int64)


def get_seg_train_transforms(config) -> SegTrainTransform:
    seg = config.SEG
    return SegTrainTransform(
        crop_size=config.DATA.IMAGE_SIZE, img_scale=seg.IMG_SCALE, ratio_range=seg.RATIO_RANGE,
        cat_max_ratio=seg.CAT_MAX_RATIO, flip_prob=seg.FLIP_PROB,
        distortion=PhotoMetricDistortion(seg.BRIGHTNESS_DELTA, seg.CONTRAST_RANGE, seg.SATURATION_RANGE,
                                         seg.HUE_DELTA),
        mean=config.DATA.IMAGENET_MEAN, std=config.DATA.IMAGENET_STD, ignore_index=seg.IGNORE_INDEX)


def get_seg_val_transforms(config) -> SegEvalTransform:
    return SegEvalTransform(img_scale=config.SEG.IMG_SCALE, mean=config.DATA.IMAGENET_MEAN,
                            std=config.DATA.IMAGENET_STD)
