"""The segmentor (beit_seg.py): unilm's parameter names, numerical parity with transformers'
BeitForSemanticSegmentation on unilm's blocks, the forward contract, SyncBatchNorm conversion, config checks and
starting weights from classification and pre-training checkpoints."""
import copy

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
import pytest

from beit import Beit, build_beit
from beit_seg import BeitUperNet, batch_norm, build_beit_upernet, convert_sync_batchnorm, load_backbone_weights
from config import ConfigError
from pos_resample import resample_rel_pos_table
from seg_checkpoints import transformers_logits, transformers_model, unilm_to_transformers
from seg_reference import BASE, TINY, images, paddle_logits, random_model, random_state, seg_config

TOLERANCE = 1e-4  # fp32, max abs logit difference


def _bn(prefix):
    return [prefix + suffix for suffix in ('weight', 'bias', '_mean', '_variance')]


def _conv_module(prefix):
    return [prefix + 'conv.weight', *_bn(prefix + 'bn.')]


def unilm_names(depth: int) -> set:
    """The tensors of unilm's released segmentation checkpoints (mmseg 0.11 names; BatchNorm statistics under
    Paddle's names), for a model without absolute or shared position bias."""
    names = ['backbone.cls_token', 'backbone.patch_embed.proj.weight', 'backbone.patch_embed.proj.bias']
    for i in range(depth):
        names += [f'backbone.blocks.{i}.{name}' for name in (
            'gamma_1', 'gamma_2', 'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.q_bias', 'attn.v_bias',
            'attn.relative_position_bias_table', 'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
            'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')]
    names += ['backbone.fpn1.0.weight', 'backbone.fpn1.0.bias', *_bn('backbone.fpn1.1.'), 'backbone.fpn1.3.weight',
              'backbone.fpn1.3.bias', 'backbone.fpn2.0.weight', 'backbone.fpn2.0.bias']
    for i in range(4):
        names += _conv_module(f'decode_head.psp_modules.{i}.1.')
    for i in range(3):
        names += _conv_module(f'decode_head.lateral_convs.{i}.') + _conv_module(f'decode_head.fpn_convs.{i}.')
    names += _conv_module('decode_head.bottleneck.') + _conv_module('decode_head.fpn_bottleneck.')
    names += ['decode_head.conv_seg.weight', 'decode_head.conv_seg.bias']
    names += [*_conv_module('auxiliary_head.convs.0.'), 'auxiliary_head.conv_seg.weight',
              'auxiliary_head.conv_seg.bias']
    return set(names)


def test_parameter_names_and_shapes_are_unilms():
    config = seg_config(64, BASE)
    model = build_beit_upernet(config)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert set(shapes) == unilm_names(12)
    assert shapes['backbone.fpn1.0.weight'] == [768, 768, 2, 2]  # ConvTranspose: [in, out, k, k] as torch
    assert shapes['decode_head.bottleneck.conv.weight'] == [768, 768 + 4 * 768, 3, 3]
    assert shapes['decode_head.fpn_bottleneck.conv.weight'] == [768, 4 * 768, 3, 3]
    assert shapes['decode_head.lateral_convs.0.conv.weight'] == [768, 768, 1, 1]
    assert shapes['auxiliary_head.convs.0.conv.weight'] == [256, 768, 3, 3]
    assert shapes['decode_head.conv_seg.weight'] == [7, 768, 1, 1]
    assert shapes['auxiliary_head.conv_seg.weight'] == [7, 256, 1, 1]
    batch_norms = [layer for layer in model.sublayers() if isinstance(layer, nn.BatchNorm2D)]
    assert len(batch_norms) == 1 + 4 + 1 + 3 + 3 + 1 + 1
    assert all(bn._momentum == 0.9 and bn._epsilon == 1e-5 for bn in batch_norms)  # torch's 0.1 and 1e-5
    conv_modules = [layer for layer in model.sublayers() if type(layer).__name__ == 'ConvModule']
    assert len(conv_modules) == 4 + 1 + 3 + 3 + 1 + 1 and all(m.conv.bias is None for m in conv_modules)


def test_heads_start_from_mmcv_init():
    """Kaiming normal over the fan-out for ConvModule convs, N(0, 0.01) classifiers with zero bias."""
    model = build_beit_upernet(seg_config(64, BASE))
    fpn_bottleneck = model.decode_head.fpn_bottleneck.conv.weight.numpy()
    assert fpn_bottleneck.std() == pytest.approx(np.sqrt(2.0 / (768 * 9)), rel=0.01)
    conv_seg = model.decode_head.conv_seg
    assert conv_seg.weight.numpy().std() == pytest.approx(0.01, rel=0.05)
    assert not conv_seg.bias.numpy().any()
    bound = 1.0 / np.sqrt(768 * 4)  # torch's default for ConvTranspose2d(768, 768, 2)
    fpn = model.backbone.fpn1[0].weight.numpy()
    assert np.abs(fpn).max() <= bound and np.abs(fpn).max() > 0.99 * bound


def _compare_with_transformers(config, out_indices=None):
    model, state = random_model(config)
    reference = transformers_model(config, unilm_to_transformers(state, model))
    if out_indices is not None:
        reference.config._out_indices = out_indices
    batch = images(config)
    expected = transformers_logits(reference, batch)
    actual = paddle_logits(model, batch)
    return [float(np.abs(a - e).max()) for a, e in zip(actual, expected)], actual, expected


@pytest.mark.parametrize('spec,size', [
    (TINY, 256), (TINY, 640), (BASE, 256),
    pytest.param(BASE, 640, marks=pytest.mark.slow),
], ids=['tiny-256', 'tiny-640', 'base-256', 'base-640'])
def test_equals_transformers_on_unilms_blocks(spec, size):
    """The whole network (backbone blocks, fpn, UperHead, FCN head), eval mode, BatchNorm with random statistics:
    transformers' model asked for unilm's blocks (out_indices block + 2) loads the same weights."""
    config = seg_config(size, spec)
    (main_diff, aux_diff), actual, expected = _compare_with_transformers(config)
    grid = size // 16
    assert actual[0].shape == expected[0].shape == (1, config.SEG.NUM_CLASSES, 4 * grid, 4 * grid)
    assert actual[1].shape == expected[1].shape == (1, config.SEG.NUM_CLASSES, grid, grid)
    assert main_diff < TOLERANCE and aux_diff < TOLERANCE
    assert np.abs(expected[0]).max() > 0.1  # not a vacuous comparison


def test_transformers_released_out_indices_select_blocks_1_3_5_9():
    """transformers' [3, 5, 7, 11] (its released ADE20K configs) take blocks 1, 3, 5, 9: the embedding output
    counts as its hidden_states[0] and it indexes i - 1. Our model equals it with those blocks, not with unilm's."""
    spec = {**TINY, 'MODEL.DEPTH': 12}
    same, _, _ = _compare_with_transformers(seg_config(64, {**spec, 'SEG.OUT_INDICES': [1, 3, 5, 9]}), [3, 5, 7, 11])
    assert max(same) < TOLERANCE
    other, _, _ = _compare_with_transformers(seg_config(64, {**spec, 'SEG.OUT_INDICES': [3, 5, 7, 11]}), [3, 5, 7, 11])
    assert max(other) > 10 * TOLERANCE


def test_forward_gives_both_logits_in_training_and_the_main_ones_in_eval():
    config = seg_config(64, TINY)
    model, _ = random_model(config)
    batch = paddle.to_tensor(images(config, batch=2))
    model.train()
    main, aux = model(batch)
    assert main.shape == [2, 5, 16, 16] and aux.shape == [2, 5, 4, 4]
    main.mean().backward()  # every parameter but the auxiliary head's takes part in the main logits
    unused = [name for name, p in model.named_parameters() if not p.stop_gradient and p.grad is None]
    assert unused and all(name.startswith('auxiliary_head.') for name in unused)
    model.eval()
    with paddle.no_grad():
        eval_main = model(batch)
        both = model.forward_heads(batch)
    assert isinstance(eval_main, paddle.Tensor)
    np.testing.assert_array_equal(eval_main.numpy(), both[0].numpy())


def test_batch_norm_updates_running_statistics_with_torchs_momentum():
    """running = 0.9 running + 0.1 batch (torch's momentum 0.1). The running variance takes the biased batch
    variance, where torch takes the unbiased one (n / (n - 1) times larger): a known difference for training here,
    largest for the pyramid pooling's 1x1 map (n = batch size per BatchNorm)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    layer = batch_norm(3)
    layer.train()
    layer(paddle.to_tensor(x))
    np.testing.assert_allclose(layer._mean.numpy(), 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(layer._variance.numpy(), 0.9 + 0.1 * x.var(axis=(0, 2, 3)), rtol=1e-5)


def _stand_in_sync_forward(self, x):
    """What SyncBatchNorm computes in one process, through the CPU BatchNorm kernel."""
    return F.batch_norm(x, self._mean, self._variance, self.weight, self.bias, training=self.training,
                        momentum=self._momentum, epsilon=self._epsilon)


def test_convert_sync_batchnorm_keeps_weights_statistics_momentum_and_epsilon(monkeypatch):
    config = seg_config(64, TINY, SEG__DROPOUT=0.0, MODEL__DROPPATH=0.0)
    model, state = random_model(config)
    original = copy.deepcopy(model)
    converted = convert_sync_batchnorm(model)
    assert not [layer for layer in converted.sublayers() if type(layer) is nn.BatchNorm2D]
    syncs = [layer for layer in converted.sublayers() if isinstance(layer, nn.SyncBatchNorm)]
    assert len(syncs) == 14 and all(s._momentum == 0.9 and s._epsilon == 1e-5 for s in syncs)
    assert set(converted.state_dict()) == set(state)  # checkpoints load either way
    for name, value in converted.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name])
    monkeypatch.setattr(nn.SyncBatchNorm, 'forward', _stand_in_sync_forward)
    batch = paddle.to_tensor(images(config, batch=2))
    for mode in ('eval', 'train'):  # train: batch statistics, running ones updated alike
        getattr(original, mode)()
        getattr(converted, mode)()
        with paddle.no_grad():
            expected, actual = original.forward_heads(batch), converted.forward_heads(batch)
        for e, a in zip(expected, actual):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    for name, value in converted.state_dict().items():
        np.testing.assert_allclose(value.numpy(), original.state_dict()[name].numpy(), rtol=1e-6, atol=1e-7)


def test_sync_batchnorm_has_no_cpu_kernel():
    """Why convert_sync_batchnorm is for GPU runs only (its docstring's claim, checked on this Paddle)."""
    layer = nn.SyncBatchNorm(4)
    for mode in ('train', 'eval'):
        getattr(layer, mode)()
        with pytest.raises(RuntimeError, match='sync_batch_norm'):
            layer(paddle.ones([2, 4, 3, 3]))


@pytest.mark.parametrize('opts,key', [
    ({'SEG.OUT_INDICES': [3, 5, 7]}, 'SEG.OUT_INDICES'),
    ({'SEG.OUT_INDICES': [3, 5, 7, 12]}, 'SEG.OUT_INDICES'),
    ({'SEG.OUT_INDICES': [5, 3, 7, 11]}, 'SEG.OUT_INDICES'),
    ({'SEG.CHANNELS': 0}, 'SEG.CHANNELS'),
    ({'SEG.POOL_SCALES': [1, 0]}, 'SEG.POOL_SCALES'),
    ({'SEG.DROPOUT': 1.0}, 'SEG.DROPOUT'),
])
def test_build_refuses_bad_seg_keys(opts, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        build_beit_upernet(seg_config(64, opts))


def _classifier(config, seed, **options):
    paddle.seed(seed)
    classifier = Beit(img_size=config.DATA.IMAGE_SIZE, num_classes=9, embed_dim=32, depth=4, num_heads=2, **options)
    return {name: tensor.numpy() for name, tensor in classifier.state_dict().items()}, classifier


def test_backbone_starts_from_a_classification_checkpoint_at_another_crop():
    config = seg_config(128, TINY)
    model = build_beit_upernet(config)
    fpn_before = model.backbone.fpn1[0].weight.numpy()
    state, _ = _classifier(seg_config(64, TINY), seed=3)
    state = {name: value + 0.1 if name.endswith('bias_table') else value for name, value in state.items()}
    notes = load_backbone_weights(model, state)
    text = '\n'.join(notes)
    assert 'resampled blocks.0.attn.relative_position_bias_table from 52 to 228 rows' in text
    assert 'fc_norm.bias, fc_norm.weight, head.bias, head.weight' in text
    assert 'freshly initialised: the fpn' in text
    loaded = model.backbone.state_dict()
    np.testing.assert_array_equal(loaded['blocks.2.mlp.fc1.weight'].numpy(), state['blocks.2.mlp.fc1.weight'])
    np.testing.assert_allclose(loaded['blocks.1.attn.relative_position_bias_table'].numpy(),
                               resample_rel_pos_table(state['blocks.1.attn.relative_position_bias_table'], (8, 8)),
                               rtol=1e-6)
    np.testing.assert_array_equal(model.backbone.fpn1[0].weight.numpy(), fpn_before)


def test_backbone_from_a_checkpoint_at_the_crop_gives_the_classifiers_block_features():
    config = seg_config(64, TINY)
    model = build_beit_upernet(config)
    state, classifier = _classifier(config, seed=4)
    load_backbone_weights(model, state)
    batch = paddle.to_tensor(images(config))
    classifier.eval()
    model.eval()
    with paddle.no_grad():
        expected = classifier.forward_intermediates(batch, indices=[0, 1, 2, 3], intermediates_only=True)
        actual = model.backbone.forward_intermediates(batch, indices=[0, 1, 2, 3], intermediates_only=True)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a.numpy(), e.numpy())


def test_backbone_spreads_a_pretraining_shared_table_to_every_block():
    config = seg_config(64, TINY)
    model = build_beit_upernet(config)
    state, _ = _classifier(config, seed=5, use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    shared = np.random.default_rng(0).normal(size=state['rel_pos_bias.relative_position_bias_table'].shape)
    state['rel_pos_bias.relative_position_bias_table'] = shared.astype(np.float32)
    state['mask_token'] = np.zeros([1, 1, 32], np.float32)
    notes = load_backbone_weights(model, state)
    assert any('copied the shared relative position bias into 4 blocks' in note for note in notes)
    for block in model.backbone.blocks:
        np.testing.assert_array_equal(block.attn.relative_position_bias_table.numpy(), shared.astype(np.float32))


def test_backbone_weights_refuse_a_segmentation_state_dict():
    config = seg_config(64, TINY)
    model = build_beit_upernet(config)
    state = random_state(model)
    backbone_part = {name[len('backbone.'):]: value for name, value in state.items() if name.startswith('backbone.')}
    with pytest.raises(Exception, match='fpn'):
        load_backbone_weights(model, backbone_part)


def test_build_follows_model_keys():
    config = seg_config(64, TINY, MODEL__DROPPATH=0.2, MODEL__INIT_VALUES=0.5)
    model = build_beit_upernet(config)
    assert isinstance(model, BeitUperNet)
    assert model.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert float(model.backbone.blocks[0].gamma_1.numpy()[0]) == pytest.approx(0.5)
    assert model.backbone.pos_embed is None and model.backbone.fc_norm is None
    assert isinstance(build_beit(config), Beit)  # the classification builder is untouched by SEG keys
