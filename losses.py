"""Training losses of the BEiT fine-tuning recipe, numerically equal to timm's.

Label smoothing is paddle's own ``cross_entropy(label_smoothing=...)``, which gives timm's numbers. The
soft-target loss is written out instead: paddle's fused ``soft_label`` kernel returns softmax - target as
the gradient, which is the loss's gradient only when every target row sums to exactly 1.
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

_INDEX_DTYPES = (paddle.int32, paddle.int64)


def check_class_labels(labels: paddle.Tensor, count: int) -> None:
    """Refuse anything but ``count`` integer class indices, from their metadata alone: reading the values would
    stall a GPU every step. The values are checked where they come from (the dataset lists, against
    MODEL.NUM_CLASSES) and again by Paddle's one_hot and cross_entropy kernels."""
    if not isinstance(labels, paddle.Tensor):
        raise TypeError(f'labels must be a paddle.Tensor of class indices, got {type(labels).__name__}')
    if list(labels.shape) != [count]:
        raise ValueError(f'labels must have shape [{count}] (one class index per sample), got {list(labels.shape)}')
    if labels.dtype not in _INDEX_DTYPES:
        raise TypeError(f'labels must be int32 or int64 class indices, got {labels.dtype}')


def _check_logits(logits: paddle.Tensor) -> None:
    if not isinstance(logits, paddle.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        shape = list(logits.shape) if isinstance(logits, paddle.Tensor) else type(logits).__name__
        raise ValueError(f'logits must be a float tensor [batch, num_classes], got {shape}')


class LabelSmoothingCrossEntropy(nn.Layer):
    """Cross-entropy against (1 - smoothing) one-hot plus smoothing spread evenly over all classes."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'smoothing (TRAIN.SMOOTHING) must lie in [0, 1), got {smoothing!r}')
        self.smoothing = smoothing

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        _check_logits(logits)
        check_class_labels(labels, logits.shape[0])
        return F.cross_entropy(logits, labels, label_smoothing=self.smoothing)


class SoftTargetCrossEntropy(nn.Layer):
    """Cross-entropy against class weights per sample (the targets Mixup/CutMix produce), batch mean."""

    def forward(self, logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
        _check_logits(logits)
        if not isinstance(targets, paddle.Tensor) or list(targets.shape) != list(logits.shape):
            shape = list(targets.shape) if isinstance(targets, paddle.Tensor) else type(targets).__name__
            raise ValueError(f'soft targets must have the logits shape {list(logits.shape)}, got {shape}')
        if not targets.is_floating_point():
            raise TypeError(f'soft targets must be float class weights, got {targets.dtype}')
        return paddle.sum(-targets * F.log_softmax(logits, axis=-1), axis=-1).mean()


def build_criterion(config, mixup_active: bool) -> nn.Layer:
    """The training loss by unilm's rule: soft targets under Mixup/CutMix, else smoothing, else plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.TRAIN.SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(config.TRAIN.SMOOTHING)
    return nn.CrossEntropyLoss()
