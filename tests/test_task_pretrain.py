"""The pre-training task: its objective against torch's cross entropy on the masked positions of timm's blocks,
and the tokenizer it builds from the config."""
import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF

from config import get_config
from engine import Amp
from helpers import ROOT
from losses import cross_entropy
from masking_generator import masked_positions
from task_pretrain import MaskedImageModelingObjective, build_tokenizer_for
from test_beit_pretrain import GRID, loaded_model, random_masks, torch_mim_logits
from timm_reference import PRETRAIN_VOCAB as VOCAB
from timm_reference import TINY, pretraining_checkpoint, random_batch


class FixedTokenizer:
    """Stands in for the DALL-E encoder: the given ids, whatever the image."""

    def __init__(self, ids):
        self.ids = ids

    def get_codebook_indices(self, images):
        return paddle.to_tensor(self.ids)


def pretraining_batch(images, masks, count):
    """What the loader ships: patch view, tokenizer view (unused by FixedTokenizer), mask, masked positions."""
    positions = np.stack([masked_positions(mask, count) for mask in masks])
    return (paddle.to_tensor(images), paddle.zeros([len(masks), 3, 32, 32]), paddle.to_tensor(masks),
            paddle.to_tensor(positions))


def boolean_indexed_loss(model, images, masks, ids):
    """The objective as it was: logits and labels of the masked patches picked by boolean-mask indexing."""
    masks = paddle.to_tensor(masks)
    logits = model.lm_head(model.forward_tokens(paddle.to_tensor(images), masks)[:, 1:][masks])
    labels = paddle.to_tensor(ids)[masks]
    return cross_entropy(logits, labels), (logits.argmax(axis=-1) == labels).astype('float64').sum()


def test_gathered_positions_give_the_boolean_indexed_loss_and_gradient_with_short_masks():
    """Masks of 6, 4 and 0 patches shipped as 6 positions each: the padding counts for nothing, so loss, counts and
    gradients are those of boolean-mask indexing over the 10 masked patches."""
    _, state = pretraining_checkpoint()
    model = loaded_model(state).train()
    images = random_batch(3, TINY['IMAGE_SIZE'])
    masks = random_masks(3)
    masks[1, np.flatnonzero(masks[1])[:2]] = False
    masks[2] = False
    ids = np.random.default_rng(1).integers(0, VOCAB, (3, GRID * GRID))
    paddle.seed(3)  # the same drop-path draws in both passes (train mode, MODEL.DROPPATH 0.1)
    expected_loss, expected_correct = boolean_indexed_loss(model, images, masks, ids)
    expected_loss.backward()
    expected_grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    paddle.seed(3)
    loss, counts = MaskedImageModelingObjective(FixedTokenizer(ids))(model, pretraining_batch(images, masks, 6), Amp())
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    np.testing.assert_allclose(counts.numpy(), [expected_loss.item() * 10, expected_correct.item(), 10, 3], rtol=1e-6)
    assert expected_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, parameter in model.named_parameters():
        if name in expected_grads:
            np.testing.assert_allclose(parameter.grad.numpy(), expected_grads[name], rtol=1e-5, atol=1e-7,
                                       err_msg=name)


def test_a_batch_without_masked_patches_costs_nothing():
    _, state = pretraining_checkpoint()
    masks = np.zeros((2, GRID * GRID), dtype=bool)
    loss, counts = MaskedImageModelingObjective(FixedTokenizer(np.zeros((2, GRID * GRID), np.int64)))(
        loaded_model(state), pretraining_batch(random_batch(2, TINY['IMAGE_SIZE']), masks, 6), Amp())
    assert loss.item() == 0.0
    np.testing.assert_array_equal(counts.numpy(), [0, 0, 0, 2])


def test_loss_and_accuracy_equal_torch_cross_entropy_on_masked_positions():
    reference, state = pretraining_checkpoint()
    model = loaded_model(state)
    images, masks = random_batch(3, TINY['IMAGE_SIZE']), random_masks(3)
    ids = np.random.default_rng(1).integers(0, VOCAB, (3, GRID * GRID))
    with torch.no_grad():
        logits = torch_mim_logits(reference, state, torch.from_numpy(images), torch.from_numpy(masks))
        labels = torch.from_numpy(ids)[torch.from_numpy(masks)]
        expected_loss = TF.cross_entropy(logits, labels).item()
        expected_correct = (logits.argmax(-1) == labels).sum().item()
    objective = MaskedImageModelingObjective(FixedTokenizer(ids))
    batch = pretraining_batch(images, masks, count=6)
    loss, counts = objective(model, batch, Amp())
    with paddle.no_grad():
        ours = model(*batch[:1], *batch[2:]).numpy()
    assert ours.shape == (18, VOCAB)
    np.testing.assert_allclose(ours, logits.numpy(), atol=1e-5)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-5)
    np.testing.assert_allclose(counts.numpy(), [expected_loss * 18, expected_correct, 18, 3], rtol=1e-5)
    summary = objective.summarise(counts.numpy())
    assert summary['mlm_acc'] == expected_correct / 18 and summary['num_samples'] == 3


def test_tokenizer_from_config_is_reproducible_and_loads_converted_weights(tmp_path):
    """A random tokenizer must be the same in every process and after -resume: it is seeded by SEED."""
    config = get_config(str(ROOT / 'configs' / 'beit_tiny_pretrain_fashion_mnist.yaml'))
    first = build_tokenizer_for(config)
    paddle.seed(123)  # whatever the generator's state, the same tokenizer
    second = build_tokenizer_for(config)
    config.SEED = 1
    other = build_tokenizer_for(config)
    names = list(first.state_dict())
    for name in names:
        np.testing.assert_array_equal(first.state_dict()[name].numpy(), second.state_dict()[name].numpy())
    assert any(not np.array_equal(first.state_dict()[n].numpy(), other.state_dict()[n].numpy()) for n in names)
    paddle.save(first.state_dict(), str(tmp_path / 'tokenizer.pdparams'))
    config.PRETRAIN.TOKENIZER_WEIGHTS = str(tmp_path / 'tokenizer.pdparams')
    config.PRETRAIN.RANDOM_TOKENIZER = False
    loaded = build_tokenizer_for(config)
    views = paddle.rand([2, 3, 32, 32]) * 0.8 + 0.1
    ids = loaded.get_codebook_indices(views)
    assert ids.shape == [2, 16] and ids.dtype == paddle.int64
    np.testing.assert_array_equal(ids.numpy(), first.get_codebook_indices(views).numpy())
