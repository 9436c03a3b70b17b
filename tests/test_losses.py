"""losses.py against timm's LabelSmoothingCrossEntropy / SoftTargetCrossEntropy: values and logit gradients."""
import argparse

import numpy as np
import paddle
import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy as TimmLabelSmoothingCE
from timm.loss import SoftTargetCrossEntropy as TimmSoftTargetCE

import benchmark_loss
import losses
from config import get_config
from losses import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, build_criterion

RELATIVE_TOLERANCE = 1e-6
FLOAT32_GRAD_TOLERANCE = 5e-6
SHAPES = [(8, 10), (5, 1000), (1, 3)]  # (batch, classes)


def _random_logits(rng, batch_size, num_classes):
    return (rng.standard_normal((batch_size, num_classes)) * 4).astype(np.float32)


def _random_soft_targets(rng, batch_size, num_classes):
    weights = rng.random((batch_size, num_classes)).astype(np.float32) ** 4
    return weights / weights.sum(axis=1, keepdims=True)


def _as(array, dtype):
    """Soft targets follow the logits' precision; class indices stay integers."""
    return array.astype(dtype) if array.dtype.kind == 'f' else array


def _paddle_loss_and_grad(criterion, logits, target):
    logits_tensor = paddle.to_tensor(logits, stop_gradient=False)
    loss = criterion(logits_tensor, paddle.to_tensor(_as(target, logits.dtype)))
    loss.backward()
    return loss.item(), logits_tensor.grad.numpy()


def _timm_loss_and_grad(criterion, logits, target):
    logits_tensor = torch.tensor(logits, requires_grad=True)
    loss = criterion(logits_tensor, torch.tensor(_as(target, logits.dtype)))
    loss.backward()
    return loss.item(), logits_tensor.grad.numpy()


def _assert_matches_timm(ours, theirs, logits, target):
    """Values and gradients against timm in float64; float32 values against timm's float32 ones.

    float32 gradients are held to timm's exact (float64) gradient with a float32-sized bound: timm's own
    float32 gradients stray up to ~2e-6 from its float64 ones, so 1e-6 would test the kernels, not the formulas.
    Ours are computed in float32 from float32 logits (no float64 anywhere).
    """
    loss32, grad32 = _paddle_loss_and_grad(ours, logits, target)
    loss64, grad64 = _paddle_loss_and_grad(ours, logits.astype(np.float64), target)
    ref_loss32, _ = _timm_loss_and_grad(theirs, logits, target)
    ref_loss64, ref_grad64 = _timm_loss_and_grad(theirs, logits.astype(np.float64), target)
    assert abs(loss32 - ref_loss32) <= RELATIVE_TOLERANCE * abs(ref_loss32)
    assert abs(loss64 - ref_loss64) <= RELATIVE_TOLERANCE * abs(ref_loss64)
    # Element-wise relative error is meaningless where a gradient entry is ~0: scale by the largest entry.
    scale = np.abs(ref_grad64).max()
    assert np.abs(grad64 - ref_grad64).max() <= RELATIVE_TOLERANCE * scale
    assert np.abs(grad32 - ref_grad64).max() <= FLOAT32_GRAD_TOLERANCE * scale


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3, 0.9])
@pytest.mark.parametrize(('batch_size', 'num_classes'), SHAPES)
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_label_smoothing_matches_timm(smoothing, batch_size, num_classes, seed):
    rng = np.random.default_rng([seed, batch_size, num_classes])
    logits = _random_logits(rng, batch_size, num_classes)
    labels = rng.integers(0, num_classes, batch_size)
    _assert_matches_timm(LabelSmoothingCrossEntropy(smoothing), TimmLabelSmoothingCE(smoothing), logits, labels)


@pytest.mark.parametrize(('batch_size', 'num_classes'), SHAPES)
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_soft_target_matches_timm(batch_size, num_classes, seed):
    rng = np.random.default_rng([seed, batch_size, num_classes])
    logits = _random_logits(rng, batch_size, num_classes)
    targets = _random_soft_targets(rng, batch_size, num_classes)
    _assert_matches_timm(SoftTargetCrossEntropy(), TimmSoftTargetCE(), logits, targets)


def test_soft_target_gradient_holds_for_rows_not_summing_to_one():
    """Targets (1, 1) on equal logits: the loss is 2 log 2 whatever the logits' shift, so the gradient is 0."""
    targets = np.ones((2, 2), np.float32)
    logits = np.zeros((2, 2), np.float32)
    loss, grad = _paddle_loss_and_grad(SoftTargetCrossEntropy(), logits, targets)
    ref_loss, ref_grad = _timm_loss_and_grad(TimmSoftTargetCE(), logits, targets)
    assert loss == pytest.approx(2 * np.log(2.0), rel=1e-7) and ref_loss == pytest.approx(loss, rel=1e-7)
    np.testing.assert_array_equal(grad, np.zeros((2, 2), np.float32))
    np.testing.assert_array_equal(ref_grad, grad)


def test_label_smoothing_value_by_hand():
    """Two classes, equal logits: every class has log-probability log(1/2) whatever the smoothing."""
    loss = LabelSmoothingCrossEntropy(0.2)(paddle.zeros([3, 2]), paddle.to_tensor([0, 1, 1]))
    assert loss.item() == pytest.approx(np.log(2.0), rel=1e-7)


def test_soft_target_value_by_hand():
    """Logits (0, log 3) give probabilities (1/4, 3/4); target (1/2, 1/2) costs (log 4 + log 4/3) / 2."""
    logits = paddle.to_tensor([[0.0, np.log(3.0)]], dtype='float32')
    loss = SoftTargetCrossEntropy()(logits, paddle.to_tensor([[0.5, 0.5]]))
    assert loss.item() == pytest.approx((np.log(4.0) + np.log(4.0 / 3.0)) / 2, rel=1e-6)


def test_build_criterion_follows_the_unilm_rule():
    config = get_config()
    assert config.TRAIN.SMOOTHING == 0.1
    assert type(build_criterion(config, mixup_active=True)) is SoftTargetCrossEntropy
    smoothing = build_criterion(config, mixup_active=False)
    assert type(smoothing) is LabelSmoothingCrossEntropy
    assert smoothing.smoothing == 0.1
    config.TRAIN.SMOOTHING = 0.0
    plain = build_criterion(config, mixup_active=False)
    assert type(plain) is LabelSmoothingCrossEntropy and plain.smoothing == 0.0
    assert type(build_criterion(config, mixup_active=True)) is SoftTargetCrossEntropy


@pytest.mark.parametrize('smoothing', [-0.1, 1.0, 1.5])
def test_smoothing_out_of_range_is_refused(smoothing):
    with pytest.raises(ValueError, match=r'smoothing \(TRAIN.SMOOTHING\) must lie in \[0, 1\)'):
        LabelSmoothingCrossEntropy(smoothing)


@pytest.mark.parametrize(('labels', 'error', 'message'), [
    (paddle.to_tensor([0, 3, 4]), ValueError, r'index_sample\) expected >= 0 and < 4, but got 4'),
    (paddle.to_tensor([0, -1, 2]), ValueError, r'index_sample\) expected >= 0 and < 4, but got -1'),
    (paddle.to_tensor([[0], [1], [2]]), ValueError, r'labels must have shape \[3\] .*got \[3, 1\]'),
    (paddle.to_tensor([0, 1]), ValueError, r'labels must have shape \[3\] .*got \[2\]'),
    (paddle.to_tensor([0.0, 1.0, 2.0]), TypeError, 'labels must be int32 or int64 class indices, got paddle.float32'),
    ([0, 1, 2], TypeError, 'labels must be a paddle.Tensor of class indices, got list'),
])
def test_bad_labels_are_refused(labels, error, message):
    with pytest.raises(error, match=message):
        LabelSmoothingCrossEntropy(0.1)(paddle.zeros([3, 4]), labels)


@pytest.mark.parametrize(('targets', 'error', 'message'), [
    (paddle.full([3, 5], 0.2), ValueError, r'soft targets must have the logits shape \[3, 4\], got \[3, 5\]'),
    (paddle.to_tensor([0, 1, 2]), ValueError, r'soft targets must have the logits shape \[3, 4\], got \[3\]'),
    (paddle.zeros([3, 4], 'int64'), TypeError, 'soft targets must be float class weights, got paddle.int64'),
])
def test_bad_soft_targets_are_refused(targets, error, message):
    with pytest.raises(error, match=message):
        SoftTargetCrossEntropy()(paddle.zeros([3, 4]), targets)


@pytest.mark.parametrize('criterion', [LabelSmoothingCrossEntropy(0.1), SoftTargetCrossEntropy()])
def test_logits_must_be_a_float_matrix(criterion):
    with pytest.raises(ValueError, match=r'logits must be a float tensor \[batch, num_classes\], got \[4\]'):
        criterion(paddle.zeros([4]), paddle.to_tensor([0, 1, 2, 3]))


@pytest.mark.parametrize('gap', [120.0, 1e3, 1e4])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_confident_mistakes_cost_what_timm_says(gap, smoothing):
    """Paddle's CPU log_softmax clips at -64: for [0, -120, 50] and label 1 it reported 61.40 (smoothing 0.1)
    and 64.0 (one-hot soft target) where timm gives 160.33 and 170.0."""
    logits = np.array([[0.0, -gap, 50.0], [3.0, 1.0, -gap]], np.float32)
    labels = np.array([1, 2])
    _assert_matches_timm(LabelSmoothingCrossEntropy(smoothing), TimmLabelSmoothingCE(smoothing), logits, labels)
    _assert_matches_timm(SoftTargetCrossEntropy(), TimmSoftTargetCE(), logits, np.eye(3, dtype=np.float32)[labels])
    if gap == 120.0:
        value = LabelSmoothingCrossEntropy(0.1)(paddle.to_tensor(logits[:1]), paddle.to_tensor(labels[:1]))
        assert value.item() == pytest.approx(160.33, abs=0.01)


@pytest.fixture()
def on_a_gpu(monkeypatch):
    """Stand-in for a GPU, whose reductions sum in a tree: row sums are taken in float32, as losses does there."""
    monkeypatch.setattr(losses, 'sums_in_float64', lambda values: False)


def _requested_dtypes(monkeypatch) -> list:
    """The dtypes asked of Tensor.astype and Tensor.sum from now on."""
    requested = []
    for name in ('astype', 'sum'):
        original = getattr(paddle.Tensor, name)

        def recording(tensor, *args, _original=original, **kwargs):
            requested.extend(str(value) for value in (*args, *kwargs.values()) if 'float' in str(value))
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(paddle.Tensor, name, recording)
    return requested


def _losses_and_gradients(logits: np.ndarray, rng) -> None:
    tensor = paddle.to_tensor(logits, stop_gradient=False)
    batch_size, num_classes = logits.shape
    for criterion, target in ((LabelSmoothingCrossEntropy(0.1), rng.integers(0, num_classes, batch_size)),
                              (SoftTargetCrossEntropy(), _random_soft_targets(rng, batch_size, num_classes))):
        criterion(tensor, paddle.to_tensor(target)).backward()


def test_float32_logits_are_never_widened_to_float64_on_a_gpu(on_a_gpu, monkeypatch):
    """A GPU computes float64 at a fraction of its float32 speed: there the float32 loss stays in float32."""
    requested = _requested_dtypes(monkeypatch)
    rng = np.random.default_rng(0)
    _losses_and_gradients(_random_logits(rng, 6, 50), rng)
    assert requested and not [dtype for dtype in requested if '64' in dtype], requested


@pytest.mark.parametrize(('batch_size', 'num_classes'), SHAPES)
def test_gpu_formulas_match_timm(on_a_gpu, batch_size, num_classes):
    rng = np.random.default_rng([7, batch_size, num_classes])
    logits = _random_logits(rng, batch_size, num_classes)
    labels = rng.integers(0, num_classes, batch_size)
    _assert_matches_timm(LabelSmoothingCrossEntropy(0.1), TimmLabelSmoothingCE(0.1), logits, labels)
    _assert_matches_timm(SoftTargetCrossEntropy(), TimmSoftTargetCE(), logits,
                         _random_soft_targets(rng, batch_size, num_classes))


def _errors_at_8192_classes() -> tuple[float, float]:
    """(relative error of the loss, largest gradient error / largest gradient) against float64, for float32
    logits of pre-training's shape (rows of 8,192 visual tokens), over logit scales 1 to 100."""
    rng = np.random.default_rng(0)
    loss_error = grad_error = 0.0
    for scale in (1, 4, 20, 100):
        logits = (rng.standard_normal((64, 8192)) * scale).astype(np.float32)
        labels = rng.integers(0, 8192, 64)
        wide = logits.astype(np.float64)
        log_sum = np.log(np.exp(wide - wide.max(1, keepdims=True)).sum(1)) + wide.max(1)
        expected_grad = np.exp(wide - log_sum[:, None])
        expected_grad[np.arange(64), labels] -= 1
        loss, grad = _paddle_loss_and_grad(LabelSmoothingCrossEntropy(0.0), logits, labels)
        expected = (log_sum - wide[np.arange(64), labels]).mean()
        loss_error = max(loss_error, abs(loss - expected) / expected)
        grad_error = max(grad_error, np.abs(grad - expected_grad / 64).max() / np.abs(expected_grad / 64).max())
    return loss_error, grad_error


def test_cpu_sums_keep_pretraining_rows_exact_in_float32():
    """On the CPU rows are summed in float64 blocks (measured: 9.5e-8 and 8.2e-8). Summed in float32 by Paddle's
    CPU kernel, one value after another, the gradient would be off by 2.2e-5 of its largest entry."""
    loss_error, grad_error = _errors_at_8192_classes()
    assert loss_error <= 5e-7 and grad_error <= 5e-7, (loss_error, grad_error)


def test_float32_cpu_sums_alone_would_not_be_exact(on_a_gpu):
    """Why the CPU keeps float64 row sums: Paddle's float32 CPU sum over 8,192 values strays by ~2e-5."""
    loss_error, grad_error = _errors_at_8192_classes()
    assert grad_error > 1e-5, (loss_error, grad_error)


def test_the_loss_adds_about_one_copy_of_the_logits_to_peak_memory():
    """Forward and backward of [4000, 4096] float32 logits in a fresh process: the peak RSS grows by the logits'
    gradient and one more copy at most (the float64 version added 9 copies, torch adds 3)."""
    rows, classes = 4000, 4096
    result = benchmark_loss.run_child('ours', argparse.Namespace(rows=rows, classes=classes))
    assert 'error' not in result, result
    assert result['peak_mb'] <= 2.2 * rows * classes * 4 / 2**20, result
