"""Training and evaluation losses, numerically equal to timm's for any logits.

Both are written on ``log_probabilities`` (logits - log-sum-exp) rather than Paddle's log_softmax and
cross_entropy: Paddle 3.3.1's CPU kernels clip log-probabilities at -64, so a confident mistake (logits
[0, -120, 50], label 1) reports 64 where the loss is 170, although the gradient is right. Paddle's fused
``soft_label`` kernel also returns softmax - target as the gradient, which is the soft-target loss's gradient
only when every target row sums to exactly 1.
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


def log_probabilities(logits: paddle.Tensor) -> paddle.Tensor:
    """log softmax over the last axis, exact for any gap between the logits: shifted by the row maximum (a
    constant, so detached) and computed in float64, since Paddle's float32 CPU exp is good to ~2e-6 only, which
    the gradient of a 1000-class softmax would show. The logits of one batch are small beside the model."""
    wide = logits.astype('float64')
    shifted = wide - wide.max(axis=-1, keepdim=True).detach()
    return (shifted - paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))).astype(logits.dtype)


def cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, smoothing: float = 0.0,
                  reduction: str = 'mean') -> paddle.Tensor:
    """Cross entropy against (1 - smoothing) on the label plus ``smoothing`` spread over all classes, as timm's
    LabelSmoothingCrossEntropy (plain cross entropy at 0); ``reduction`` 'mean' or 'sum' over the rows."""
    log_probs = log_probabilities(logits)
    loss = -(F.one_hot(labels, logits.shape[-1]).astype(log_probs.dtype) * log_probs).sum(axis=-1)
    if smoothing:
        loss = (1.0 - smoothing) * loss - smoothing * log_probs.mean(axis=-1)
    return loss.mean() if reduction == 'mean' else loss.sum()


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
        return cross_entropy(logits, labels, self.smoothing)


class SoftTargetCrossEntropy(nn.Layer):
    """Cross-entropy against class weights per sample (the targets Mixup/CutMix produce), batch mean."""

    def forward(self, logits: paddle.Tensor, targets: paddle.Tensor) -> paddle.Tensor:
        _check_logits(logits)
        if not isinstance(targets, paddle.Tensor) or list(targets.shape) != list(logits.shape):
            shape = list(targets.shape) if isinstance(targets, paddle.Tensor) else type(targets).__name__
            raise ValueError(f'soft targets must have the logits shape {list(logits.shape)}, got {shape}')
        if not targets.is_floating_point():
            raise TypeError(f'soft targets must be float class weights, got {targets.dtype}')
        return paddle.sum(-targets * log_probabilities(logits), axis=-1).mean()


def build_criterion(config, mixup_active: bool) -> nn.Layer:
    """The training loss by unilm's rule: soft targets under Mixup/CutMix, else smoothing (0: plain CE)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(config.TRAIN.SMOOTHING)
