"""engine.py on in-memory batches: exact evaluation counts, gradient accumulation equal to one large batch,
a non-finite loss stopping before any weight changes, one host sync per optimizer step."""
import logging
from collections import Counter

import numpy as np
import paddle
import pytest

from beit import build_beit
from config import get_config
from engine import Amp, NonFiniteLossError, Trainer, World, evaluate, train_one_epoch
from model_ema import ModelEma
from optim import build_lr_scheduler, build_optimizer
from task_finetune import FINE_TUNING, ClassificationObjective
from tiny_data import TINY_CONFIG

LOGGER = logging.getLogger('test_engine')


def tiny_config(**train):
    config = get_config(TINY_CONFIG)
    config.MODEL.DROPPATH = 0.0
    for key, value in train.items():
        config.TRAIN[key] = value
    return config


def make_trainer(config, steps_per_epoch):
    paddle.seed(0)
    model = build_beit(config)
    scheduler = build_lr_scheduler(config, steps_per_epoch, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    return Trainer(model=model, module=model, optimizer=optimizer, lr_scheduler=scheduler,
                   grad_scaler=paddle.amp.GradScaler(enable=False),
                   objective=ClassificationObjective(paddle.nn.CrossEntropyLoss()),
                   world=World(), accum_iter=config.TRAIN.ACCUM_ITER)


def batches(count, size, seed=0):
    rng = np.random.default_rng(seed)
    return [(paddle.to_tensor(rng.standard_normal((size, 3, 32, 32)).astype('float32')),
             paddle.to_tensor(rng.integers(0, 10, size).astype('int64'))) for _ in range(count)]


def test_evaluate_reports_exact_totals_over_uneven_batches():
    config = tiny_config()
    paddle.seed(0)
    model = build_beit(config)
    data = batches(3, 5) + batches(1, 2, seed=1)
    result = evaluate(model, data, World(), Amp(), ClassificationObjective(paddle.nn.CrossEntropyLoss()))
    logits = np.concatenate([model(images).numpy() for images, _ in data]).astype(np.float64)
    labels = np.concatenate([labels.numpy() for _, labels in data])
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
    assert result['num_samples'] == 17
    assert result['loss'] == pytest.approx(-log_probs[np.arange(17), labels].mean(), rel=1e-5)
    assert result['acc1'] == pytest.approx((ranks < 1).mean())
    assert result['acc5'] == pytest.approx((ranks < 5).mean())


def test_accumulating_k_batches_equals_one_batch_of_k_times_b():
    k, b, steps = 4, 3, 2
    small = batches(k * steps, b)
    large = [(paddle.concat([x for x, _ in small[i:i + k]]), paddle.concat([y for _, y in small[i:i + k]]))
             for i in range(0, k * steps, k)]
    accumulated = make_trainer(tiny_config(ACCUM_ITER=k, GRAD_CLIP=1.0, WARMUP_EPOCHS=0), steps)
    whole = make_trainer(tiny_config(ACCUM_ITER=1, GRAD_CLIP=1.0, WARMUP_EPOCHS=0), steps)
    first = train_one_epoch(accumulated, small + batches(k - 1, b, seed=5), 1, 1, steps, 1, LOGGER)
    second = train_one_epoch(whole, large, 1, 1, steps, 1, LOGGER)
    assert accumulated.global_step == whole.global_step == steps
    assert first['num_samples'] == second['num_samples'] == k * b * steps  # the k - 1 leftover batches unused
    assert first['loss'] == pytest.approx(second['loss'], rel=1e-6)
    moved = 0.0
    start = make_trainer(tiny_config(), steps).module.state_dict()
    for name, value in whole.module.state_dict().items():
        actual = accumulated.module.state_dict()[name].numpy()
        np.testing.assert_allclose(actual, value.numpy(), rtol=0, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(value.numpy() - start[name].numpy()).max()))
    assert moved > 1e-4  # the steps did change the weights


def test_non_finite_loss_stops_before_the_optimizer_step():
    trainer = make_trainer(tiny_config(), 2)
    trainer.module.head.bias.set_value(paddle.full_like(trainer.module.head.bias, float('nan')))
    before = {name: value.numpy().copy() for name, value in trainer.module.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match='nan at epoch 3 step 1'):
        train_one_epoch(trainer, batches(2, 4), 3, 5, 2, 1, LOGGER)
    for name, value in trainer.module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[name])
    assert trainer.global_step == 0


# Tensor methods that copy values to the host: on a GPU each one waits for every kernel queued before it.
HOST_SYNCS = ('numpy', 'item', 'tolist', '__bool__', '__float__', '__int__', '__index__')


@pytest.fixture()
def host_syncs(monkeypatch):
    """Counts host syncs: ``ours``, and ``optimizer`` for those made inside Paddle's optimizer step (with a grad
    scaler it reads the scaler's found_inf there: paddle/optimizer/optimizer.py, ``if found_inf:``)."""
    counts, inside_step, depth = Counter(), [], []

    def counting(original):
        def method(tensor, *args, **kwargs):
            if not depth:  # Paddle's __bool__ calls numpy(): one sync
                counts['optimizer' if inside_step else 'ours'] += 1
            depth.append(True)
            try:
                return original(tensor, *args, **kwargs)
            finally:
                depth.pop()
        return method

    for name in HOST_SYNCS:
        monkeypatch.setattr(paddle.Tensor, name, counting(getattr(paddle.Tensor, name)))
    original_step = paddle.optimizer.AdamW.step

    def step(optimizer):
        inside_step.append(True)
        try:
            return original_step(optimizer)
        finally:
            inside_step.pop()

    monkeypatch.setattr(paddle.optimizer.AdamW, 'step', step)
    return counts


class DeviceSideScaler:
    """A stand-in for an enabled float16 GradScaler (Paddle's runs on GPUs only) that does what Paddle's does
    with its inf/nan verdict: keeps it on the device in _found_inf and hands it to the optimizer step."""

    def is_enable(self):
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        grads = [param.grad.sum() for param in optimizer._parameter_list if param.grad is not None]
        self._found_inf = paddle.logical_not(paddle.isfinite(paddle.add_n(grads)))

    def step(self, optimizer):
        optimizer._set_auxiliary_var('found_inf', self._found_inf)
        optimizer.step()

    def update(self):
        pass


@pytest.mark.parametrize('scaler, paddle_syncs', [('none', 0), ('device-side', 1)])
def test_one_host_sync_per_optimizer_step(scaler, paddle_syncs, host_syncs):
    """The recipe's step (Mixup/CutMix, soft-target loss, clipping, EMA, accumulation of 2) reads the device once;
    with a grad scaler, Paddle's optimizer step reads the scaler's verdict once more."""
    config = tiny_config(ACCUM_ITER=2, GRAD_CLIP=1.0)
    trainer = make_trainer(config, steps_per_epoch=3)
    trainer.objective = FINE_TUNING.build_objective(config, World())
    trainer.model_ema = ModelEma(trainer.module, 0.9)
    if scaler == 'device-side':
        trainer.grad_scaler = DeviceSideScaler()
    data = batches(6, 4)
    host_syncs.clear()
    result = train_one_epoch(trainer, data, 1, 1, steps=3, report_freq=100, logger=LOGGER)
    assert result['skipped_steps'] == 0 and trainer.global_step == 3
    assert host_syncs['ours'] == 3 and host_syncs['optimizer'] == 3 * paddle_syncs, dict(host_syncs)
