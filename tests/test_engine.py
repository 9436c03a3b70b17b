"""engine.py on in-memory batches: exact evaluation counts, gradient accumulation equal to one large batch,
a non-finite loss stopping before any weight changes."""
import logging

import numpy as np
import paddle
import pytest
from tiny_data import TINY_CONFIG

from beit import build_beit
from config import get_config
from engine import (
    Amp,
    ClassificationObjective,
    NonFiniteLossError,
    Trainer,
    World,
    evaluate,
    topk_correct,
    train_one_epoch,
)
from optim import build_lr_scheduler, build_optimizer

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


def test_topk_correct_counts_rows_with_the_label_among_the_k_best():
    logits = paddle.to_tensor([[0.0, 5, 4, 3, 2, 1, -1], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7]])
    labels = paddle.to_tensor([1, 5, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels).numpy(), [1, 1])


def test_evaluate_reports_exact_totals_over_uneven_batches():
    config = tiny_config()
    paddle.seed(0)
    model = build_beit(config)
    data = batches(3, 5) + batches(1, 2, seed=1)
    result = evaluate(model, data, World(), amp=Amp())
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
