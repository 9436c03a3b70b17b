"""Mixup (arXiv 1710.09412) and CutMix (arXiv 1905.04899) on a batch, with label smoothing in the targets.

The semantics are timm's ``Mixup``, which the BEiT recipe trains with: sample i is mixed with sample B-1-i
(its partner in the reversed batch), per whole batch, per pair or per element. ``Mixup.draw`` makes the
random choices in numpy, from a Generator the caller may pass, in timm's order; ``Mixup.mix`` applies them
with paddle. An odd batch is accepted: its middle sample is its own partner, so it comes out unchanged
(up to rounding: Mixup computes x * lam + x * (1 - lam)); pair mode leaves it out.

In training the draws travel with the batch: ``BatchDraws`` makes them in the loader (datasets.get_dataloader's
``batch_draws``), as two arrays (``MixParams.shipped``), and the step mixes with tensor operations only: no copy
from the host and no read of the device.
"""
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from config import MIXUP_MODES
from losses import check_class_labels

NUM_WEIGHTS = 4  # label own, label partner, pixel own, pixel partner


@dataclass(frozen=True)
class MixParams:
    """The draws for one batch, per sample.

    label_weight: [B] weight of the sample's own target; under CutMix the share of the image left unpasted.
        float32 when drawn per pair or element and float64 when drawn once per batch: timm's precisions,
        which decide the CutMix box size at the edges.
    pixel_weight: [B] weight of the sample's own pixels outside its box (1 under CutMix).
    boxes: [B, 4] int top, bottom (rows, along H), left, right (columns, along W) of the region pasted
        from the partner; top == bottom for none.
    """

    label_weight: np.ndarray
    pixel_weight: np.ndarray
    boxes: np.ndarray

    def shipped(self) -> tuple[np.ndarray, np.ndarray]:
        """What a batch carries: float32 [B, 4] weights (label own, label partner, pixel own, pixel partner; each
        partner weight 1 - w taken in w's precision, as timm does) and int64 [B, 4] boxes."""
        weights = [(weight, 1 - weight) for weight in (self.label_weight, self.pixel_weight)]
        return (np.stack([part.astype(np.float32) for pair in weights for part in pair], axis=1),
                self.boxes.astype(np.int64))


class BatchDraws:
    """A loader's draws for training batches of ``height`` x ``width`` images: ``draws(batch_size)`` gives the
    shipped arrays of ``mixup.draw``, consumed from ``mixup.rng`` in batch order (so reseeding the Mixup reseeds
    these). A function of the batch size only: the loader draws before the images are loaded."""

    def __init__(self, mixup: 'Mixup', height: int, width: int):
        self.mixup, self.height, self.width = mixup, height, width

    def __call__(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.mixup.draw(batch_size, self.height, self.width).shipped()


def _image_batch_shape(images: paddle.Tensor) -> tuple[int, int, int]:
    """Batch size, height and width of a float [B, C, H, W] tensor."""
    if not isinstance(images, paddle.Tensor):
        raise TypeError(f'images must be a paddle.Tensor [B, C, H, W], got {type(images).__name__}')
    if images.ndim != 4:
        raise ValueError(f'images must have shape [B, C, H, W], got {list(images.shape)}')
    if not images.is_floating_point():
        raise TypeError(f'images must be floating point, got {images.dtype}')
    if images.shape[0] == 0:
        raise ValueError('images: cannot mix an empty batch')
    batch_size, _, height, width = images.shape
    return batch_size, height, width


def _check_draws(draws, batch_size: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The (weights, boxes) tensors of a batch's shipped draws, checked from their metadata only."""
    if len(draws) != 2 or not all(isinstance(part, paddle.Tensor) for part in draws):
        raise TypeError('Mixup draws must be two tensors, weights [B, 4] and boxes [B, 4] (MixParams.shipped); '
                        f'got {[type(part).__name__ for part in draws]}')
    weights, boxes = draws
    if weights.shape[0] != batch_size:
        raise ValueError(f'Mixup draws were made for {weights.shape[0]} samples, the batch has {batch_size}')
    if list(weights.shape) != [batch_size, NUM_WEIGHTS] or list(boxes.shape) != [batch_size, 4]:
        raise ValueError(f'Mixup draws must be weights [{batch_size}, {NUM_WEIGHTS}] and boxes [{batch_size}, 4], '
                         f'got {list(weights.shape)} and {list(boxes.shape)}')
    if not weights.is_floating_point() or boxes.is_floating_point():
        raise TypeError(f'Mixup draws must be float weights and integer boxes, got {weights.dtype} and {boxes.dtype}')
    return weights, boxes


def _own_and_partner(weights: paddle.Tensor, first: int, rank: int, dtype) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Columns ``first`` and ``first + 1`` of the shipped weights (w and 1 - w), shaped [B, 1, ...] to broadcast."""
    shape = [-1] + [1] * (rank - 1)
    return tuple(weights[:, column].reshape(shape).astype(dtype) for column in (first, first + 1))


def _box_mask(boxes: paddle.Tensor, height: int, width: int) -> paddle.Tensor:
    """[B, 1, H, W] bool, True inside each sample's box."""
    top, bottom, left, right = boxes.reshape([-1, 4, 1, 1]).unbind(axis=1)
    rows = paddle.arange(height, dtype=boxes.dtype).reshape([1, height, 1])
    cols = paddle.arange(width, dtype=boxes.dtype).reshape([1, 1, width])
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return inside.unsqueeze(1)


def mix_images(images: paddle.Tensor, weights: paddle.Tensor, boxes: paddle.Tensor) -> paddle.Tensor:
    """Blend each image with its partner, then paste the partner's pixels inside the box (a new tensor)."""
    _, height, width = _image_batch_shape(images)
    partner = images.flip(0)
    own_weight, partner_weight = _own_and_partner(weights, 2, 4, images.dtype)
    blended = images * own_weight + partner * partner_weight
    return paddle.where(_box_mask(boxes, height, width), partner, blended)


def smoothed_one_hot(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """float32 [B, num_classes]: smoothing / num_classes everywhere, 1 - smoothing more on the label."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    hot = F.one_hot(labels, num_classes)
    return paddle.where(hot > 0, paddle.full_like(hot, on_value), paddle.full_like(hot, off_value))


def mix_targets(labels: paddle.Tensor, num_classes: int, smoothing: float, weights: paddle.Tensor) -> paddle.Tensor:
    """Soft targets: each smoothed one-hot blended with its partner's by the label weights of ``weights``."""
    own_target = smoothed_one_hot(labels, num_classes, smoothing)
    own_weight, partner_weight = _own_and_partner(weights, 0, 2, own_target.dtype)
    return own_target * own_weight + own_target.flip(0) * partner_weight


def _group_of_sample(mode: str, batch_size: int, untouched: int) -> np.ndarray:
    """Which draw each sample uses; the odd middle sample of a pair batch gets the ``untouched`` one."""
    if mode == 'batch':
        return np.zeros(batch_size, dtype=np.int64)
    if mode == 'elem':
        return np.arange(batch_size)
    half = np.arange(batch_size // 2)
    return np.concatenate([half, [untouched] * (batch_size % 2), half[::-1]]).astype(np.int64)


def _with_untouched(values: np.ndarray, filler) -> np.ndarray:
    """``values`` plus one more row meaning "leave the sample alone", keeping their dtype."""
    return np.concatenate([values, np.full((1, *values.shape[1:]), filler, dtype=values.dtype)])


def _check_settings(num_classes, mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode,
                    label_smoothing) -> None:
    if mode not in MIXUP_MODES:
        raise ValueError(f'mode (TRAIN.MIXUP_MODE) must be one of {list(MIXUP_MODES)}, got {mode!r}')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f'num_classes (MODEL.NUM_CLASSES) must be a positive int for Mixup, got {num_classes!r}')
    for name, key, value in (('mixup_alpha', 'TRAIN.MIXUP_ALPHA', mixup_alpha),
                             ('cutmix_alpha', 'TRAIN.CUTMIX_ALPHA', cutmix_alpha)):
        if value < 0:
            raise ValueError(f'{name} ({key}) must not be negative, got {value!r}')
    for name, key, value in (('prob', 'TRAIN.MIXUP_PROB', prob),
                             ('switch_prob', 'TRAIN.MIXUP_SWITCH_PROB', switch_prob),
                             ('label_smoothing', 'TRAIN.SMOOTHING', label_smoothing)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f'{name} ({key}) must lie in [0, 1], got {value!r}')
    if cutmix_minmax and not (len(cutmix_minmax) == 2 and 0.0 <= cutmix_minmax[0] < cutmix_minmax[1] <= 1.0):
        raise ValueError('cutmix_minmax (TRAIN.CUTMIX_MINMAX) must be [min, max] with 0 <= min < max <= 1, '
                         f'got {list(cutmix_minmax)}')
    if not (mixup_alpha > 0 or cutmix_alpha > 0 or cutmix_minmax):
        raise ValueError('Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or a cutmix_minmax '
                         '(TRAIN.MIXUP_ALPHA, TRAIN.CUTMIX_ALPHA, TRAIN.CUTMIX_MINMAX); all are off')


class Mixup:
    """Mixup or CutMix per batch, pair or element, returning mixed images and soft float32 targets.

    ``prob`` is the chance to mix at all, ``switch_prob`` the chance of CutMix when both are on. A CutMix
    box is centred at random with sides sqrt(1 - lambda) of the image's, or, with ``cutmix_minmax``, has
    sides drawn between min and max of the image's; with ``correct_lam`` (always with minmax) lambda is then
    recomputed from the box clipped to the image.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 cutmix_minmax: tuple[float, float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = 'batch', label_smoothing: float = 0.1, correct_lam: bool = True,
                 rng: np.random.Generator | None = None):
        _check_settings(num_classes, mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode,
                        label_smoothing)
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax else None
        # timm's rule: a min/max box ignores lambda; its Beta(1, 1) draw only keeps CutMix on and the draw order.
        self.cutmix_alpha = 1.0 if self.cutmix_minmax else cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.mode = mode
        self.label_smoothing = label_smoothing
        self.correct_lam = correct_lam
        self.rng = rng if rng is not None else np.random.default_rng()

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Draw for this batch, then mix: (mixed images, float32 targets [B, num_classes]). It copies the draws
        from the host: a training step gets them with its batch (BatchDraws) and calls ``mix``."""
        batch_size, height, width = _image_batch_shape(images)
        shipped = self.draw(batch_size, height, width).shipped()
        return self.mix(images, labels, [paddle.to_tensor(part) for part in shipped])

    def mix(self, images: paddle.Tensor, labels: paddle.Tensor, draws) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Apply a batch's draws, the tensors (weights, boxes) of MixParams.shipped: (mixed images, targets
        [B, num_classes]); the inputs are left untouched."""
        batch_size, _, _ = _image_batch_shape(images)
        check_class_labels(labels, batch_size)
        weights, boxes = _check_draws(draws, batch_size)
        targets = mix_targets(labels, self.num_classes, self.label_smoothing, weights)
        return mix_images(images, weights, boxes), targets

    def draw(self, batch_size: int, height: int, width: int) -> MixParams:
        """The random choices for a [batch_size, C, height, width] batch, consumed from ``self.rng``."""
        if self.mode == 'batch':
            lam, use_cutmix = self._draw_for_batch()
        else:
            lam, use_cutmix = self._draw_per_group(batch_size if self.mode == 'elem' else batch_size // 2)
        pixel_weight = np.where(use_cutmix, 1, lam)
        boxes, lam = self._draw_boxes(lam, use_cutmix, height, width)
        group = _group_of_sample(self.mode, batch_size, untouched=len(lam))
        return MixParams(label_weight=_with_untouched(lam, 1)[group],
                         pixel_weight=_with_untouched(pixel_weight, 1)[group],
                         boxes=_with_untouched(boxes, 0)[group])

    def _choose_cutmix(self, count: int | None = None):
        """CutMix (True) or Mixup per draw; a coin is thrown only when both are on."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return self.rng.random(count) < self.switch_prob
        return np.full(() if count is None else count, self.cutmix_alpha > 0)

    def _draw_for_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """One draw in timm's order: mix at all?, then CutMix?, then lambda (kept in double precision)."""
        if self.rng.random() >= self.prob:
            return np.ones(1), np.zeros(1, dtype=bool)
        use_cutmix = self._choose_cutmix()
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return np.array([self.rng.beta(alpha, alpha)]), np.array([use_cutmix])

    def _draw_per_group(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` draws in timm's order: CutMix?, CutMix lambdas, Mixup lambdas, then mix at all?"""
        use_cutmix = self._choose_cutmix(count)
        lam = np.ones(count)
        if self.cutmix_alpha > 0:
            lam = np.where(use_cutmix, self.rng.beta(self.cutmix_alpha, self.cutmix_alpha, count), lam)
        if self.mixup_alpha > 0:
            lam = np.where(use_cutmix, lam, self.rng.beta(self.mixup_alpha, self.mixup_alpha, count))
        applied = self.rng.random(count) < self.prob
        return np.where(applied, lam.astype(np.float32), np.float32(1)), use_cutmix

    def _draw_boxes(self, lam: np.ndarray, use_cutmix: np.ndarray, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
        """A box for every group that CutMixes, in group order, and lambdas corrected to the unpasted share."""
        boxes = np.zeros((len(lam), 4), dtype=np.int64)
        lam = lam.copy()
        for group in np.flatnonzero(use_cutmix & (lam != 1)):
            if self.cutmix_minmax:
                boxes[group] = self._draw_minmax_box(height, width)
            else:
                boxes[group] = self._draw_centred_box(lam[group], height, width)
            if self.correct_lam or self.cutmix_minmax:
                top, bottom, left, right = boxes[group]
                lam[group] = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return boxes, lam

    def _draw_centred_box(self, lam, height: int, width: int) -> tuple[int, int, int, int]:
        """Sides sqrt(1 - lam) of the image's around a uniform centre, clipped to the image."""
        ratio = np.sqrt(1 - lam)
        cut_height, cut_width = int(height * ratio), int(width * ratio)
        centre_row = self.rng.integers(0, height)
        centre_col = self.rng.integers(0, width)
        return (max(centre_row - cut_height // 2, 0), min(centre_row + (cut_height + 1) // 2, height),
                max(centre_col - cut_width // 2, 0), min(centre_col + (cut_width + 1) // 2, width))

    def _draw_minmax_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Sides uniform in [min, max) of the image's (integer pixels), placed inside the image."""
        low, high = self.cutmix_minmax
        side_ranges = [(int(size * low), int(size * high)) for size in (height, width)]
        for size, (shortest, longest) in zip((height, width), side_ranges):
            if shortest >= longest:
                raise ValueError(f'cutmix_minmax (TRAIN.CUTMIX_MINMAX) {list(self.cutmix_minmax)} leaves no box '
                                 f'side to draw for an image side of {size} pixels')
        cut_height, cut_width = (self.rng.integers(shortest, longest) for shortest, longest in side_ranges)
        top = self.rng.integers(0, height - cut_height + 1)
        left = self.rng.integers(0, width - cut_width + 1)
        return top, top + cut_height, left, left + cut_width


def build_mixup(config, rng: np.random.Generator | None = None) -> Mixup | None:
    """The recipe's Mixup/CutMix from TRAIN.* and MODEL.NUM_CLASSES; None when both are off (all zero).

    Pass ``rng`` seeded from SEED and the process rank for reproducible runs that differ across processes.
    """
    train = config.TRAIN
    if train.MIXUP_ALPHA == 0 and train.CUTMIX_ALPHA == 0 and not train.CUTMIX_MINMAX:
        return None
    return Mixup(num_classes=config.MODEL.NUM_CLASSES, mixup_alpha=train.MIXUP_ALPHA,
                 cutmix_alpha=train.CUTMIX_ALPHA, cutmix_minmax=train.CUTMIX_MINMAX or None,
                 prob=train.MIXUP_PROB, switch_prob=train.MIXUP_SWITCH_PROB, mode=train.MIXUP_MODE,
                 label_smoothing=train.SMOOTHING, rng=rng)
