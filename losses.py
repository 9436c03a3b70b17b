"""Training and evaluation losses, numerically equal to timm's for any logits.

Both are computed by ``cross_entropy_rows``, a max-shifted log-sum-exp with its own backward, rather than Paddle's
log_softmax and cross_entropy: Paddle 3.3.1's CPU kernels clip log-probabilities at -64, so a confident mistake
(logits [0, -120, 50], label 1) reports 64 where the loss is 170, although the gradient is right; its
``logsumexp`` and ``log_softmax`` are good to ~5e-6 only (measured, float32, 1000 classes), because its CPU sum
adds a row one value after another in float32 (its float32 ``exp`` is good to ~1.2e-7). Paddle's fused
``soft_label`` kernel also returns softmax - target as the gradient, which is the soft-target loss's gradient
only when every target row sums to exactly 1.
"""
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

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


ROW_BLOCK_ELEMENTS = 1 << 20  # the rows summed at once: temporaries of 4 MB (float32), 8 MB (float64) at most


def sums_in_float64(values: paddle.Tensor) -> bool:
    """Whether row sums of ``values`` need float64 accumulation: on the CPU for float32, because Paddle's CPU sum
    adds a row's values one after another (over 8,192 float32 values: 2.4e-5 relative error, measured; numpy's
    pairwise float32 sum: 2.8e-7). Paddle's GPU reduce kernel (phi/kernels/funcs/reduce_function.h,
    ReduceAnyKernel) adds short per-thread runs, then combines them in a tree: float32 suffices there (read from
    the sources, not measured: no GPU here), and a GPU computes float64 at a fraction of its float32 speed."""
    return values.place.is_cpu_place() and values.dtype == paddle.float32


def _row_sums(values: paddle.Tensor, weights: paddle.Tensor | None = None) -> paddle.Tensor:
    """[N] sums of the rows of ``values`` [N, C] (times ``weights`` [N, C]), in ``values``' dtype. Taken over
    blocks of rows when a temporary is needed (the product, or the float64 copy of sums_in_float64), so that it
    holds ROW_BLOCK_ELEMENTS values at most instead of a copy of the whole matrix."""
    wide = sums_in_float64(values)
    if weights is None and not wide:
        return values.sum(axis=-1)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(values.shape[-1], 1))
    sums = []
    for start in range(0, values.shape[0], rows):
        block = values[start:start + rows]
        if weights is not None:
            block = block * weights[start:start + rows]
        sums.append(block.sum(axis=-1, dtype='float64' if wide else None))
    return paddle.concat(sums).astype(values.dtype)


def _widened(logits: paddle.Tensor) -> paddle.Tensor:
    """float32 and float64 logits as they are; half precision ones in float32. Never float64 on a GPU."""
    return logits if logits.dtype in (paddle.float32, paddle.float64) else logits.astype('float32')


class _CrossEntropyRows(PyLayer):
    """Per-row cross entropy against class weights: (sum of the weights) * log-sum-exp - weights . logits.

    ``target`` is either int class indices [N] (weights: 1 - smoothing on the label plus smoothing / C on every
    class) or float class weights [N, C] (no gradient). Everything is computed on the logits shifted by their row
    maximum, which keeps a confident mistake exact in float32. Forward and backward each hold one [N, C] buffer
    beside the logits: the shifted logits, exponentiated in place, and in backward that buffer becomes the logits'
    gradient (weight sum * softmax - weights), so the loss adds about one copy of the logits to peak memory (soft
    targets add one more in backward: the weights times the incoming gradient). Row sums are _row_sums'.
    """

    @staticmethod
    def forward(ctx, logits, target, smoothing):
        wide = _widened(logits)
        top = wide.max(axis=-1, keepdim=True)
        shifted = wide - top
        if target.is_floating_point():
            target = target.astype(wide.dtype)
            weight_sum = _row_sums(target)
            weighted = _row_sums(shifted, target)
        else:
            weight_sum = paddle.ones_like(top.reshape([-1]))
            weighted = paddle.index_sample(shifted, target.reshape([-1, 1])).reshape([-1]) * (1.0 - smoothing)
            if smoothing:
                weighted = weighted + _row_sums(shifted) * (smoothing / shifted.shape[-1])
        sum_exp = _row_sums(shifted.exp_())
        ctx.save_for_backward(logits, target, top, sum_exp, weight_sum)
        ctx.smoothing = smoothing
        return (weight_sum * paddle.log(sum_exp) - weighted).astype(logits.dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        logits, target, top, sum_exp, weight_sum = ctx.saved_tensor()
        grad = grad_rows.astype(top.dtype).unsqueeze(-1)
        buffer = (_widened(logits) - top).exp_()
        buffer.multiply_(grad * (weight_sum / sum_exp).unsqueeze(-1))
        if target.is_floating_point():
            buffer.subtract_(target * grad)
        else:
            if ctx.smoothing:
                buffer.subtract_(grad * (ctx.smoothing / logits.shape[-1]))
            buffer.put_along_axis_(target.reshape([-1, 1]), grad * -(1.0 - ctx.smoothing), 1, reduce='add')
        return buffer.astype(logits.dtype), None  # astype to the same dtype copies nothing


def cross_entropy_rows(logits: paddle.Tensor, target: paddle.Tensor, smoothing: float = 0.0) -> paddle.Tensor:
    """[N] cross entropy of each row of ``logits`` [N, C] against class indices ``target`` [N] smoothed by
    ``smoothing`` (timm's LabelSmoothingCrossEntropy rows; plain cross entropy at 0), or against float class weights
    ``target`` [N, C] (timm's SoftTargetCrossEntropy rows; ``smoothing`` unused). Class indices outside [0, C) are
    refused by Paddle's index_sample kernel on the CPU."""
    return _CrossEntropyRows.apply(logits, target.detach(), float(smoothing))


def cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor, smoothing: float = 0.0,
                  reduction: str = 'mean') -> paddle.Tensor:
    """Cross entropy against (1 - smoothing) on the label plus ``smoothing`` spread over all classes, as timm's
    LabelSmoothingCrossEntropy (plain cross entropy at 0); ``reduction`` 'mean' or 'sum' over the rows."""
    loss = cross_entropy_rows(logits, labels, smoothing)
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
        return cross_entropy_rows(logits, targets).mean()


def build_criterion(config, mixup_active: bool) -> nn.Layer:
    """The training loss by unilm's rule: soft targets under Mixup/CutMix, else smoothing (0: plain CE)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(config.TRAIN.SMOOTHING)
