"""engine.py on in-memory batches: exact evaluation counts, gradient accumulation equal to one large batch,
a non-finite loss stopping before any weight changes, one host sync per optimizer step."""
import logging
from collections import Counter

import numpy as np
import paddle
import pytest

import engine
from beit import build_beit
from beit_pretrain import build_beit_pretrain
from config import get_config
from engine import Amp, NonFiniteLossError, Trainer, World, evaluate, train_one_epoch
from helpers import TINY_CONFIG, tiny_config
from model_ema import ModelEma
from optim import build_lr_scheduler, build_optimizer
from task_finetune import FINE_TUNING, ClassificationObjective
from task_pretrain import MaskedImageModelingObjective

LOGGER = logging.getLogger('test_engine')
PRETRAIN_VOCAB = 64
TINY_PATCH = get_config(TINY_CONFIG).MODEL.PATCH_SIZE  # 32 px images
NO_DROPPATH = ('MODEL.DROPPATH', 0.0)  # exact comparisons need the same forward pass in every run


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
    config = tiny_config(*NO_DROPPATH)
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
    accumulated = make_trainer(tiny_config(*NO_DROPPATH, ACCUM_ITER=k, GRAD_CLIP=1.0, WARMUP_EPOCHS=0), steps)
    whole = make_trainer(tiny_config(*NO_DROPPATH, ACCUM_ITER=1, GRAD_CLIP=1.0, WARMUP_EPOCHS=0), steps)
    first = train_one_epoch(accumulated, small + batches(k - 1, b, seed=5), 1, 1, steps, 1, LOGGER)
    second = train_one_epoch(whole, large, 1, 1, steps, 1, LOGGER)
    assert accumulated.global_step == whole.global_step == steps
    assert first['num_samples'] == second['num_samples'] == k * b * steps  # the k - 1 leftover batches unused
    assert first['loss'] == pytest.approx(second['loss'], rel=1e-6)
    moved = 0.0
    start = make_trainer(tiny_config(*NO_DROPPATH), steps).module.state_dict()
    for name, value in whole.module.state_dict().items():
        actual = accumulated.module.state_dict()[name].numpy()
        np.testing.assert_allclose(actual, value.numpy(), rtol=0, atol=1e-6, err_msg=name)
        moved = max(moved, float(np.abs(value.numpy() - start[name].numpy()).max()))
    assert moved > 1e-4  # the steps did change the weights


def test_non_finite_loss_stops_before_the_optimizer_step():
    trainer = make_trainer(tiny_config(*NO_DROPPATH), 2)
    trainer.module.head.bias.set_value(paddle.full_like(trainer.module.head.bias, float('nan')))
    before = {name: value.numpy().copy() for name, value in trainer.module.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match='nan at epoch 3 step 1'):
        train_one_epoch(trainer, batches(2, 4), 3, 5, 2, 1, LOGGER)
    for name, value in trainer.module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[name])
    assert trainer.global_step == 0


# Tensor methods that copy values to the host: on a GPU each one waits for every kernel queued before it.
HOST_SYNCS = ('numpy', 'item', 'tolist', '__bool__', '__float__', '__int__', '__index__')


def _has_bool_tensor(index) -> bool:
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(part, paddle.Tensor) and part.dtype == paddle.bool for part in parts)


@pytest.fixture()
def host_syncs(monkeypatch):
    """Counts host syncs: ``ours``, and ``optimizer`` for those made inside Paddle's optimizer step (with a grad
    scaler it reads the scaler's found_inf there: paddle/optimizer/optimizer.py, ``if found_inf:``). A sync is a
    read of device values (HOST_SYNCS), a copy of host data to the device (paddle.to_tensor or paddle.assign of
    numpy or Python values: on a GPU a synchronous copy from pageable memory) or a boolean-mask index (its shape
    depends on the mask's values). ``ours: to_tensor`` and the like say which were counted."""
    counts, inside_step, depth = Counter(), [], []

    def counted(kind, original, applies=lambda *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            if not depth and applies(*args, **kwargs):  # Paddle's __bool__ calls numpy(): one sync
                where = 'optimizer' if inside_step else 'ours'
                counts[where] += 1
                counts[f'{where}: {kind}'] += 1
            depth.append(True)
            try:
                return original(*args, **kwargs)
            finally:
                depth.pop()
        return wrapper

    for name in HOST_SYNCS:
        monkeypatch.setattr(paddle.Tensor, name, counted(name, getattr(paddle.Tensor, name)))
    from_host = lambda data, *args, **kwargs: not isinstance(data, paddle.Tensor)  # noqa: E731
    monkeypatch.setattr(paddle, 'to_tensor', counted('to_tensor', paddle.to_tensor, from_host))
    monkeypatch.setattr(paddle, 'assign', counted('assign', paddle.assign, from_host))
    monkeypatch.setattr(paddle.Tensor, '__getitem__', counted('bool index', paddle.Tensor.__getitem__,
                                                              lambda tensor, index: _has_bool_tensor(index)))
    original_step = paddle.optimizer.AdamW.step

    def step(optimizer):
        inside_step.append(True)
        try:
            return original_step(optimizer)
        finally:
            inside_step.pop()

    monkeypatch.setattr(paddle.optimizer.AdamW, 'step', step)
    return counts


def test_the_sync_counter_sees_host_copies_and_boolean_indexing(host_syncs):
    values = paddle.arange(4)
    paddle.to_tensor(np.zeros(2))
    paddle.assign(np.ones(3, np.float32))
    values[values > 1]
    values[1:]
    paddle.assign(values)  # device to device: no sync
    assert dict(host_syncs) == {'ours': 3, 'ours: to_tensor': 1, 'ours: assign': 1, 'ours: bool index': 1}


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


def with_draws(data, objective):
    """The batches as the train loader gives them: each with its Mixup draws (copied to tensors by the loader)."""
    return [(images, labels, *(paddle.to_tensor(part) for part in objective.batch_draws(labels.shape[0])))
            for images, labels in data]


@pytest.mark.parametrize('scaler, paddle_syncs', [('none', 0), ('device-side', 1)])
def test_one_host_sync_per_optimizer_step(scaler, paddle_syncs, host_syncs):
    """The recipe's step (Mixup/CutMix, soft-target loss, clipping, EMA, accumulation of 2) reads the device once
    and copies nothing from the host; with a grad scaler, Paddle's optimizer step reads the scaler's verdict once
    more. (Drawing Mixup in the step cost 5 host copies a micro-batch.)"""
    config = tiny_config(*NO_DROPPATH, ACCUM_ITER=2, GRAD_CLIP=1.0)
    trainer = make_trainer(config, steps_per_epoch=3)
    trainer.objective = FINE_TUNING.build_objective(config, World())
    trainer.model_ema = ModelEma(trainer.module, 0.9)
    if scaler == 'device-side':
        trainer.grad_scaler = DeviceSideScaler()
    data = with_draws(batches(6, 4), trainer.objective)
    host_syncs.clear()
    result = train_one_epoch(trainer, data, 1, 1, steps=3, report_freq=100, logger=LOGGER)
    assert result['skipped_steps'] == 0 and trainer.global_step == 3
    assert host_syncs['ours'] == 3 and host_syncs['optimizer'] == 3 * paddle_syncs, dict(host_syncs)


class DeviceTokenizer:
    """Stands in for the DALL-E tokenizer: visual tokens computed on the device from the tokenizer view."""

    def get_codebook_indices(self, views):
        corners = views[:, 0, ::TINY_PATCH, ::TINY_PATCH].reshape([views.shape[0], -1])  # a value per patch
        return (corners.abs() * 1000).astype('int64') % PRETRAIN_VOCAB


def pretraining_batches(count, size, seed=0):
    """(patch view, tokenizer view, mask, positions) as the pre-training loader ships them: 6 masked patches."""
    rng = np.random.default_rng(seed)
    num_patches = (32 // TINY_PATCH) ** 2
    result = []
    for _ in range(count):
        masks = np.zeros((size, num_patches), dtype=bool)
        for mask in masks:
            mask[rng.choice(num_patches, 6, replace=False)] = True
        result.append((paddle.to_tensor(rng.standard_normal((size, 3, 32, 32)).astype('float32')),
                       paddle.to_tensor(rng.standard_normal((size, 3, 32, 32)).astype('float32')),
                       paddle.to_tensor(masks), paddle.to_tensor(np.stack([np.flatnonzero(m) for m in masks]))))
    return result


def test_one_host_sync_per_pretraining_step(host_syncs):
    """Pre-training's step (gathered masked patches, accumulation of 2) reads the device once and copies nothing
    from the host. (Boolean-mask indexing and to_tensor cost 4 syncs a micro-batch.)"""
    config = tiny_config(*NO_DROPPATH, ACCUM_ITER=2, GRAD_CLIP=1.0)
    config.PRETRAIN.VOCAB_SIZE = PRETRAIN_VOCAB
    paddle.seed(0)
    model = build_beit_pretrain(config)
    scheduler = build_lr_scheduler(config, 3, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    trainer = Trainer(model=model, module=model, optimizer=optimizer, lr_scheduler=scheduler,
                      grad_scaler=paddle.amp.GradScaler(enable=False),
                      objective=MaskedImageModelingObjective(DeviceTokenizer()), world=World(), accum_iter=2)
    data = pretraining_batches(6, 4)
    host_syncs.clear()
    result = train_one_epoch(trainer, data, 1, 1, steps=3, report_freq=100, logger=LOGGER)
    assert trainer.global_step == 3 and result['num_masked'] == 6 * 4 * 6
    assert host_syncs['ours'] == 3 and host_syncs['optimizer'] == 0, dict(host_syncs)


def test_evaluate_sums_the_counts_of_every_process(monkeypatch):
    """On 2 processes, each evaluating its shard, the reported metrics are the whole val set's exact counts: the
    all-reduce (a stand-in adding the other process's totals in place) sums the totals, nothing divides them."""
    config = tiny_config()
    paddle.seed(0)
    model = build_beit(config)
    objective = ClassificationObjective(paddle.nn.CrossEntropyLoss())
    own, other = batches(2, 5), batches(1, 3, seed=1) + batches(1, 4, seed=2)
    whole = evaluate(model, own + other, World(), Amp(), objective)
    with paddle.no_grad():
        other_totals = paddle.add_n([objective.evaluate_batch(model, batch, Amp()) for batch in other])
    reduced = []

    def all_reduce(values):
        reduced.append(values.numpy().copy())
        paddle.assign(values + other_totals, output=values)

    monkeypatch.setattr(paddle.distributed, 'all_reduce', all_reduce)
    result = evaluate(model, own, World(rank=0, size=2, local_size=2), Amp(), objective)
    assert len(reduced) == 1 and reduced[0][-1] == 10
    assert result['num_samples'] == whole['num_samples'] == 17
    for key in ('loss', 'acc1', 'acc5'):
        assert result[key] == pytest.approx(whole[key], rel=1e-12), key


def batch_norm_layers(seed: int) -> paddle.nn.Sequential:
    """A BatchNorm2D and a SyncBatchNorm whose running statistics are those of one process's batches."""
    paddle.seed(seed)
    layers = paddle.nn.Sequential(paddle.nn.BatchNorm2D(3), paddle.nn.SyncBatchNorm(3))
    layers.train()
    layers[0](paddle.randn([4, 3, 5, 5]) * (seed + 1) + seed)  # SyncBatchNorm cannot run on a CPU: left as built
    return layers


def test_batch_norm_statistics_are_averaged_over_the_processes_and_sync_ones_left_alone(monkeypatch):
    """Rank 0's BatchNorm2D ends with the mean of both processes' running statistics (the all-reduce stand-in adds
    the other rank's), the weights and the SyncBatchNorm untouched; one process changes nothing."""
    own, other = batch_norm_layers(0), batch_norm_layers(1)
    before = {name: value.numpy().copy() for name, value in own.state_dict().items()}
    assert engine.average_batch_norm_statistics(own, World()) == 1
    assert all(np.array_equal(value.numpy(), before[name]) for name, value in own.state_dict().items())
    others = other.state_dict()
    other_statistics = iter([others['0._mean'], others['0._variance']])  # in the order the layer's state dict has

    def all_reduce(values):
        paddle.assign(values + next(other_statistics), output=values)

    monkeypatch.setattr(paddle.distributed, 'all_reduce', all_reduce)
    assert engine.average_batch_norm_statistics(own, World(rank=0, size=2, local_size=2)) == 1
    after = own.state_dict()
    for name in ('0._mean', '0._variance'):
        np.testing.assert_allclose(after[name].numpy(), (before[name] + others[name].numpy()) / 2, rtol=1e-6)
        assert not np.array_equal(before[name], others[name].numpy())
    for name in ('0.weight', '0.bias', '1._mean', '1._variance'):
        np.testing.assert_array_equal(after[name].numpy(), before[name])
