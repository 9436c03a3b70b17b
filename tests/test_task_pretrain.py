"""The pre-training task: its objectives against torch's cross entropy on the masked positions of timm's blocks
(v1) and of the timm-built unilm CLS-branch model (v2), and the tokenizer it builds from the config."""
import contextlib

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF

from beit2_reference import summed_loss
from config import get_config, merge_opts
from engine import Amp
from helpers import ROOT
from losses import cross_entropy
from masking_generator import masked_positions
from task_pretrain import PRETRAINING, ClsBranchObjective, MaskedImageModelingObjective, build_tokenizer_for
from test_beit_pretrain import GRID, loaded_model, random_masks, torch_mim_logits, v2_pair
from timm_reference import PRETRAIN_VOCAB as VOCAB
from timm_reference import TINY, pretraining_checkpoint, random_batch
from vqkd_tokenizer import VQKDTokenizer, VQKDWeightsError


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


V2_DEMO = str(ROOT / 'configs' / 'beitv2_tiny_pretrain_fashion_mnist.yaml')


@pytest.mark.parametrize('shared_lm_head', [True, False])
def test_v2_objective_is_unilms_summed_loss_with_both_branches_counted(shared_lm_head):
    """loss = CE(main) + CE(CLS branch) on the same masked patches, as the reference's; counts hold the sum, the
    main branch's correct count, masks, images, each branch's loss sum and the branch's correct count, so that
    every logged number is exact when summed over micro-batches and processes."""
    reference, model = v2_pair(early_layers=2, head_layers=2, shared_lm_head=shared_lm_head)
    images, masks = random_batch(3, TINY['IMAGE_SIZE']), random_masks(3)
    ids = np.random.default_rng(1).integers(0, VOCAB, (3, GRID * GRID))
    with torch.no_grad():
        logits = reference(torch.from_numpy(images), torch.from_numpy(masks))
        labels = torch.from_numpy(ids)[torch.from_numpy(masks)]
        parts = [TF.cross_entropy(branch, labels).item() for branch in logits]
        corrects = [(branch.argmax(-1) == labels).sum().item() for branch in logits]
        expected = summed_loss(logits, labels).item()
    objective = ClsBranchObjective(FixedTokenizer(ids))
    loss, counts = objective(model, pretraining_batch(images, masks, count=6), Amp())
    assert loss.item() == pytest.approx(expected, abs=1e-5) and expected == pytest.approx(sum(parts))
    np.testing.assert_allclose(counts.numpy(), [expected * 18, corrects[0], 18, 3, parts[0] * 18, parts[1] * 18,
                                                corrects[1]], rtol=1e-5)
    summary = objective.summarise(counts.numpy())
    assert summary['loss_main'] == pytest.approx(parts[0], abs=1e-5)
    assert summary['loss_cls'] == pytest.approx(parts[1], abs=1e-5)
    assert (summary['mlm_acc'], summary['mlm_acc_cls']) == (corrects[0] / 18, corrects[1] / 18)
    assert summary['num_samples'] == 3 and summary['num_masked'] == 18
    assert set(objective.logged) <= set(summary) and len(counts.numpy()) == objective.num_counts


def test_v2_counts_of_two_halves_add_up_to_the_whole_batch():
    """What the engine sums across micro-batches and processes: two half batches (one with a short mask) give the
    counts, and so the metrics, of the whole batch."""
    _, model = v2_pair(early_layers=2, head_layers=2, shared_lm_head=True)
    images, masks = random_batch(4, TINY['IMAGE_SIZE']), random_masks(4)
    masks[3, np.flatnonzero(masks[3])[:3]] = False
    ids = np.random.default_rng(2).integers(0, VOCAB, (4, GRID * GRID))
    whole = ClsBranchObjective(FixedTokenizer(ids))(model, pretraining_batch(images, masks, 6), Amp())[1].numpy()
    halves = sum(ClsBranchObjective(FixedTokenizer(ids[part]))(model, pretraining_batch(images[part], masks[part], 6),
                                                               Amp())[1].numpy() for part in (slice(0, 2), slice(2, 4)))
    np.testing.assert_allclose(halves, whole, rtol=1e-6)
    assert whole[2] == 21 and whole[3] == 4


def test_the_config_chooses_the_objective_and_the_task_draws_the_cls_branch_curve():
    config = get_config(V2_DEMO)
    assert isinstance(PRETRAINING.build_objective(config, None), ClsBranchObjective)
    config.PRETRAIN.CLS_PT = False
    objective = PRETRAINING.build_objective(config, None)
    assert type(objective) is MaskedImageModelingObjective and objective.num_counts == 4  # v1 unchanged
    assert isinstance(objective.tokenizer, VQKDTokenizer)  # the v1 model with the VQ-KD tokenizer, as unilm allows
    assert ('train', 'mlm_acc_cls') in {(curve.split, curve.key) for curve in PRETRAINING.curves}


def test_vqkd_tokenizer_from_config_is_the_vqkd_section_seeded_and_loads_converted_weights(tmp_path):
    config = get_config(V2_DEMO)
    first = build_tokenizer_for(config)
    assert isinstance(first, VQKDTokenizer) and not first.training
    assert first.encoder.patch_embed.grid == (4, 4) and first.codebook_size == 512
    assert first.quantize.embedding.weight.shape == [512, 32] and first.encoder.embed_dim == 64
    assert len(first.encoder.blocks) == 2 and first.encoder.blocks[0].attn.num_heads == 2
    paddle.seed(123)
    second = build_tokenizer_for(config)
    for name, value in first.state_dict().items():
        np.testing.assert_array_equal(second.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    paddle.save(first.state_dict(), str(tmp_path / 'vqkd.pdparams'))
    merge_opts(config, ['PRETRAIN.TOKENIZER_WEIGHTS', str(tmp_path / 'vqkd.pdparams'), 'PRETRAIN.RANDOM_TOKENIZER',
                        'False', 'SEED', '5'])
    views = paddle.rand([2, 3, 28, 28])
    ids = build_tokenizer_for(config).get_codebook_indices(views)
    assert ids.shape == [2, 16] and ids.dtype == paddle.int64
    np.testing.assert_array_equal(ids.numpy(), first.get_codebook_indices(views).numpy())


@pytest.mark.parametrize('key, value', [('VQKD.CODEBOOK_SIZE', '256'), ('VQKD.EMBED_DIM', '32'),
                                        ('VQKD.CODEBOOK_DIM', '16')])
def test_vqkd_weights_of_another_size_are_refused_naming_the_config_keys(key, value, tmp_path):
    config = get_config(V2_DEMO)
    paddle.save(build_tokenizer_for(config).state_dict(), str(tmp_path / 'vqkd.pdparams'))
    merge_opts(config, ['PRETRAIN.TOKENIZER_WEIGHTS', str(tmp_path / 'vqkd.pdparams'), key, value])
    with pytest.raises(VQKDWeightsError, match=f'PRETRAIN.TOKENIZER_WEIGHTS: cannot load .*vqkd.pdparams as a VQ-KD '
                                               f'tokenizer .*{key.split(".")[1]} {value}'):
        build_tokenizer_for(config)


class FlaggingAmp(Amp):
    """An Amp whose autocast only records that it is active: a GPU run's autocast, without a GPU."""

    active = False

    @contextlib.contextmanager
    def autocast(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


class RecordingTokenizer(FixedTokenizer):
    """FixedTokenizer that notes whether the objective called it under autocast, and the dtype it was given."""

    def __init__(self, ids, amp):
        super().__init__(ids)
        self.amp, self.calls = amp, []

    def get_codebook_indices(self, images):
        self.calls.append((self.amp.active, images.dtype))
        return super().get_codebook_indices(images)


@pytest.mark.parametrize('objective_class', [MaskedImageModelingObjective, ClsBranchObjective])
def test_the_tokenizer_runs_in_float32_outside_autocast(objective_class):
    """Both objectives label the patches before the model's autocast starts: the tokenizer's float32 input is never
    cast to float16/bfloat16 (unilm's beit2 runs VQ-KD under autocast; tokens near a tie could then flip)."""
    _, model = v2_pair(early_layers=2, head_layers=2, shared_lm_head=True)
    amp = FlaggingAmp()
    masks = random_masks(2)
    tokenizer = RecordingTokenizer(np.zeros((2, GRID * GRID), np.int64), amp)
    if objective_class is MaskedImageModelingObjective:
        model = loaded_model(pretraining_checkpoint()[1])
    objective_class(tokenizer)(model, pretraining_batch(random_batch(2, TINY['IMAGE_SIZE']), masks, 6), amp)
    assert tokenizer.calls == [(False, paddle.float32)]
