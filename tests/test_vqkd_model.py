"""vqkd_model.py against tests/vqkd_train_reference.py (timm + plain torch, following unilm's beit2): one training
step from the same weights and batch gives the same losses, ids, gradients of every trained tensor and the same EMA
codebook and statistics; k-means equal from the same start rows; the cross-process sum and rank 0's k-means
reach the statistics; the codebook is no parameter."""
import numpy as np
import paddle
import paddle.distributed as dist
import pytest
import torch

import vqkd_model
from task_tokenizer import cosine_reconstruction_loss
from torch_checkpoint import to_paddle_layout
from vqkd_model import VQKD, cosine_kmeans, initial_rows, sum_over_processes
from vqkd_train_reference import ReferenceVQKDTraining, kmeans_reference

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, codebook_size=64, codebook_dim=8,
            decoder_depth=1, teacher_dim=24)
BATCH = 2  # 32 features for 64 codes: unused codes every step
START = torch.tensor([3, 7, 7, 0, 31, 12] * 10 + [1, 2, 5, 9])  # k-means start rows, with repeats
# A step from k-means: fewer codes than the batch's 32 features and distinct start rows, since repeated rows make
# identical codes, whose exact ties torch and Paddle break differently.
KMEANS_CODES = 24
KMEANS_START = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:KMEANS_CODES]


def models(kmeans_init=False, seed=0):
    arch = {**ARCH, 'codebook_size': KMEANS_CODES} if kmeans_init else ARCH
    reference = ReferenceVQKDTraining(**arch, seed=seed)
    model = VQKD(**arch, mlp_ratio=4.0, kmeans_init=kmeans_init)
    state = to_paddle_layout({name: value.numpy() for name, value in reference.unilm_state_dict().items()}, model)
    model.set_state_dict({**{name: tensor.numpy() for name, tensor in model.state_dict().items()}, **state})
    if kmeans_init:
        reference.initted = False
    model.train()
    return reference, model


def batch(seed=0, repeats=1):
    rng = np.random.default_rng(seed)
    images = rng.random((BATCH, 3, 16, 16), dtype=np.float32)
    target = rng.normal(size=(BATCH, 16, ARCH['teacher_dim'])).astype(np.float32)
    return np.concatenate([images] * repeats), np.concatenate([target] * repeats)


def paddle_step(model, images, target):
    rec, quant_loss, ids = model(paddle.to_tensor(images))
    rec_loss = cosine_reconstruction_loss(rec, paddle.to_tensor(target))
    loss = quant_loss + rec_loss
    loss.backward()
    return [float(value.detach()) for value in (loss, rec_loss, quant_loss)], ids.numpy()


def reference_step(reference, images, target, start=None):
    loss, rec_loss, quant_loss, ids = reference.step_loss(images, target, start)
    loss.backward()
    return [float(value.detach()) for value in (loss, rec_loss, quant_loss)], ids.numpy()


def assert_same_step(reference, model, images, target, start=None):
    expected, expected_ids = reference_step(reference, images, target, start)
    losses, ids = paddle_step(model, images, target)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ids, expected_ids)
    grads = to_paddle_layout({name: grad.numpy() for name, grad in reference.unilm_grads().items()}, model)
    params = dict(model.named_parameters())
    assert sorted(grads) == sorted(params)
    for name, grad in grads.items():
        np.testing.assert_allclose(params[name].grad.numpy(), grad, rtol=1e-4, atol=1e-6, err_msg=name)
    quantize = model.quantize
    np.testing.assert_allclose(quantize.embedding.weight.numpy(), reference.codebook.numpy(), atol=1e-5)
    np.testing.assert_allclose(quantize.cluster_size.numpy(), reference.cluster_size.numpy(), atol=1e-6)
    return ids


def test_a_training_step_equals_unilms_loss_gradients_and_ema_update():
    reference, model = models()
    before = model.quantize.embedding.weight.numpy().copy()
    ids = assert_same_step(reference, model, *batch())
    unused = np.setdiff1d(np.arange(ARCH['codebook_size']), ids)
    assert len(unused) > 0  # an unused code keeps its row
    np.testing.assert_allclose(model.quantize.embedding.weight.numpy()[unused], before[unused], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(model.quantize.embedding.weight.numpy(), axis=1), 1.0, atol=1e-6)


def test_a_first_step_with_kmeans_init_equals_unilms_from_the_same_start_rows(monkeypatch):
    reference, model = models(kmeans_init=True)
    assert model.quantize.embedding.initted.item() == 0.0
    monkeypatch.setattr(vqkd_model, 'initial_rows', lambda n, k: paddle.to_tensor(KMEANS_START.numpy()))
    assert_same_step(reference, model, *batch(), start=KMEANS_START)
    assert model.quantize.embedding.initted.item() == 1.0
    np.testing.assert_array_equal(model.quantize.embedding.cluster_size.numpy(),
                                  reference.embed_cluster_size.numpy())


def test_later_steps_follow_the_reference_and_the_init_runs_once(monkeypatch):
    reference, model = models(kmeans_init=True)
    monkeypatch.setattr(vqkd_model, 'initial_rows', lambda n, k: paddle.to_tensor(KMEANS_START.numpy()))
    initted = []
    for seed in range(3):
        for param in model.parameters():
            param.clear_gradient()
        reference.zero_grad()
        assert_same_step(reference, model, *batch(seed), start=KMEANS_START)
        initted.append(model.quantize.embedding.cluster_size.numpy().copy())
    np.testing.assert_array_equal(initted[0], initted[2])  # k-means ran at the first step only


def test_cosine_kmeans_equals_the_reference_from_the_same_start_rows():
    rng = np.random.default_rng(0)
    samples = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 8)).astype(np.float32)), dim=-1)
    for start in (START[:16], START):  # fewer and more clusters than samples (empty clusters)
        means, counts = cosine_kmeans(paddle.to_tensor(samples.numpy()), paddle.to_tensor(start.numpy()), 10)
        expected_means, expected_counts = kmeans_reference(samples, start, 10)
        np.testing.assert_allclose(means.numpy(), expected_means.numpy(), atol=1e-6)
        np.testing.assert_array_equal(counts.numpy(), expected_counts.numpy())


def test_initial_rows_are_distinct_with_enough_samples_and_drawn_with_replacement_otherwise():
    paddle.seed(0)
    rows = initial_rows(100, 64).numpy()
    assert len(set(rows.tolist())) == 64 and rows.min() >= 0 and rows.max() < 100
    rows = initial_rows(10, 64).numpy()
    assert rows.shape == (64,) and rows.min() >= 0 and rows.max() < 10


def test_the_statistics_are_summed_over_processes_before_the_update():
    """A stand-in sum that doubles (a second process with the same batch) must update the codebook as the
    reference does on the batch twice over."""
    reference, model = models()
    model.quantize.reduce = lambda tensor: tensor * 2
    images, target = batch(repeats=2)
    reference_step(reference, images, target)
    paddle_step(model, *batch())
    np.testing.assert_allclose(model.quantize.embedding.weight.numpy(), reference.codebook.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.quantize.cluster_size.numpy(), reference.cluster_size.numpy(), atol=1e-6)


def test_sum_over_processes_all_reduces_only_with_several(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, 'all_reduce', lambda tensor: calls.append(tensor))
    value = paddle.ones([3])
    assert sum_over_processes(value) is value and not calls
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    sum_over_processes(value)
    assert calls == [value]


def test_kmeans_init_takes_rank_zeros_codebook():
    _, model = models(kmeans_init=True)
    rank_zero = paddle.nn.functional.normalize(paddle.randn([KMEANS_CODES, ARCH['codebook_dim']]), axis=-1)
    model.quantize.broadcast = lambda tensor: rank_zero if tensor.ndim == 2 else tensor
    model(paddle.to_tensor(batch()[0]))
    before_update = rank_zero.numpy()
    moved = np.abs(model.quantize.embedding.weight.numpy() - before_update).max()
    assert moved < 0.1  # one EMA step (decay 0.99) from rank 0's codebook, not from this process's k-means


def test_the_codebook_is_no_parameter_and_checkpoints_hold_unilms_names():
    _, model = models()
    assert not [name for name, _ in model.named_parameters() if name.startswith('quantize')]
    names = set(model.state_dict())
    assert {'quantize.embedding.weight', 'quantize.embedding.cluster_size', 'quantize.embedding.embed_avg',
            'quantize.embedding.initted', 'quantize.cluster_size', 'decoder.fc_norm.weight',
            'decode_task_layer.2.weight', 'encode_task_layer.0.weight'} <= names


def test_evaluation_leaves_the_codebook_and_its_statistics_alone():
    _, model = models()
    model.eval()
    before = {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}
    with paddle.no_grad():
        model(paddle.to_tensor(batch()[0]))
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), before[name], err_msg=name)


@pytest.mark.parametrize('seed', [0, 1])
def test_tokens_are_the_ids_of_the_training_forward(seed):
    _, model = models(seed=seed)
    model.eval()
    images = paddle.to_tensor(batch(seed)[0])
    _, _, ids = model(images)
    np.testing.assert_array_equal(model.tokens(images).numpy(), ids.numpy())
