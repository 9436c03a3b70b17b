"""The linear-probing task in-process: block features against timm's blocks on a unilm pre-training checkpoint, the
encoder frozen through training (bit-identical weights, no gradients, outside the optimizer, eval mode), the summed
loss against torch, unilm's optimizer settings, and the LINPROBE checks."""
import itertools
import json
import logging

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF

import cli
import job
from beit_pretrain import build_beit_pretrain
from checkpoint import weights_digest
from config import ConfigError, get_config
from engine import Amp, World
from helpers import TINY_CONFIG
from load_pytorch_weights import convert_state_dict
from task_linprobe import (
    LINEAR_PROBING,
    LinearProbeObjective,
    build_linear_probe,
    build_probe_optimizer,
    check_linear_probe_config,
    probed_blocks,
)
from timm_reference import PRETRAIN_SPEC, PRETRAIN_VOCAB, config_for, pretraining_checkpoint, random_batch
from tiny_data import write_dataset

LOGGER = logging.getLogger('test_task_linprobe')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data'), num_train=24, num_val=11)


@pytest.fixture(scope='module')
def unilm_checkpoint(tmp_path_factory):
    """(timm encoder, our .pdparams of the same unilm pre-training checkpoint, random trained-like weights)."""
    reference, state = pretraining_checkpoint()
    config = config_for(PRETRAIN_SPEC)
    config.PRETRAIN.VOCAB_SIZE = PRETRAIN_VOCAB
    model = build_beit_pretrain(config)
    fitted, _ = convert_state_dict({name: value.numpy() for name, value in state.items()}, model)
    path = tmp_path_factory.mktemp('weights') / 'pretrained.pdparams'
    paddle.save({name: paddle.to_tensor(value) for name, value in fitted.items()}, str(path))
    return reference, path


def probe_config(data, output, *flags, opts=()):
    """The tiny config as main_linprobe.py would read it, with ``flags`` and ``opts``."""
    argv = ['-cfg', TINY_CONFIG, '-data_path', str(data), '-output', str(output), *flags,
            '-opts', 'DATA.NUM_WORKERS', '0', 'LINPROBE.BATCH_SIZE', '8', *opts]
    return cli.update_config(get_config(), cli.build_arg_parser().parse_args(argv), LINEAR_PROBING)


def timm_block_features(reference, images: np.ndarray) -> list[np.ndarray]:
    """unilm's probe input written with timm's layers: after each block, concat(cls token, mean of patch tokens)."""
    with torch.no_grad():
        x = reference.patch_embed(torch.from_numpy(images))
        x = torch.cat([reference.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        shared_bias = reference.rel_pos_bias()
        features = []
        for block in reference.blocks:
            x = block(x, shared_rel_pos_bias=shared_bias)
            features.append(torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=-1).numpy())
    return features


def test_block_features_are_timms_on_a_pretraining_checkpoint_in_any_mode(unilm_checkpoint, data, tmp_path):
    """-pretrained reaches the encoder; dropout and drop path, set high, never act on the features."""
    reference, weights = unilm_checkpoint
    spec = {f'MODEL.{key}' if key != 'IMAGE_SIZE' else 'DATA.IMAGE_SIZE': str(value)
            for key, value in PRETRAIN_SPEC.items() if key != 'NUM_CLASSES'}
    config = probe_config(data, tmp_path / 'out', '-pretrained', str(weights),
                          opts=[*sum(spec.items(), ()), 'MODEL.DROPPATH', '0.5', 'MODEL.DROPOUT', '0.3'])
    probe = job.prepare(config, World(), LOGGER, LINEAR_PROBING).model
    images = random_batch(3, PRETRAIN_SPEC['IMAGE_SIZE'])
    expected = timm_block_features(reference, images)
    for mode in ('train', 'eval'):
        getattr(probe, mode)()
        features = probe.block_features(paddle.to_tensor(images))
        assert len(features) == PRETRAIN_SPEC['DEPTH']
        for block, (ours, theirs) in enumerate(zip(features, expected, strict=True)):
            assert ours.shape == [3, 2 * PRETRAIN_SPEC['EMBED_DIM']] and ours.stop_gradient
            np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-5, err_msg=f'{mode} block {block}')


def test_training_changes_the_classifiers_only(data, tmp_path):
    config = probe_config(data, tmp_path / 'run', opts=['LINPROBE.NUM_EPOCHS', '2', 'LINPROBE.BASE_LR', '0.05',
                                                        'MODEL.DROPPATH', '0.5'])
    run = job.prepare(config, World(), LOGGER, LINEAR_PROBING)
    probe = run.model
    encoder_before = {name: value.numpy().copy() for name, value in probe.encoder.state_dict().items()}
    classifiers_before = {name: value.numpy().copy() for name, value in probe.classifiers.state_dict().items()}
    assert {id(p) for p in run.trainer.optimizer._parameter_list} == {id(p) for p in probe.classifiers.parameters()}
    job.open_output(run)
    job.train(run)
    for name, value in probe.encoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), encoder_before[name], err_msg=name)
    assert all(param.stop_gradient and param.grad is None for param in probe.encoder.parameters())
    assert not probe.encoder.training and all(not layer.training for layer in probe.encoder.sublayers())
    assert all(not np.array_equal(value.numpy(), classifiers_before[name])
               for name, value in probe.classifiers.state_dict().items())
    checkpoint = paddle.load(str(tmp_path / 'run' / 'checkpoint-epoch-2.pdparams'))
    assert set(checkpoint['model']) == set(classifiers_before)  # '0.weight', '0.bias', ... of the 4 blocks
    assert checkpoint['frozen_weights'] == {'pretrained': '', 'digest': weights_digest(probe.encoder)}
    settings = json.loads((tmp_path / 'run' / 'param_groups.json').read_text())
    assert set(settings) == {f'classifiers.{name}' for name in classifiers_before}


def test_classifiers_start_as_unilms():
    """One Linear per block on [cls, mean] (2 x EMBED_DIM), weights N(0, 0.01), bias 0, seeded like the model."""
    config = get_config(TINY_CONFIG)
    config.MODEL.EMBED_DIM, config.MODEL.NUM_HEADS, config.MODEL.DEPTH = 384, 6, 2
    paddle.seed(0)
    probe = build_linear_probe(config)
    assert len(probe.classifiers) == 2
    for classifier in probe.classifiers:
        weight = classifier.weight.numpy()
        assert weight.shape == (768, 10)
        assert abs(weight.std() - 0.01) < 0.0005 and abs(weight.mean()) < 0.0005
        np.testing.assert_array_equal(classifier.bias.numpy(), 0.0)


class FixedLogits(paddle.nn.Layer):
    """Stands in for the probe: the given logits of each block, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = [paddle.to_tensor(values, stop_gradient=False) for values in logits]

    def forward(self, images):
        return self.logits


def test_loss_is_the_sum_of_the_blocks_cross_entropies_and_the_best_block_is_named():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 3, 4, 5])
    logits = [rng.standard_normal((6, 7)).astype(np.float32) for _ in range(3)]
    logits[1][np.arange(6), labels] += 5.0  # block 5 (the second probed) gets every top-1 right
    objective = LinearProbeObjective([2, 5, 7])
    batch = (paddle.zeros([6, 3, 8, 8]), paddle.to_tensor(labels))
    loss, counts = objective(FixedLogits(logits), batch, Amp())
    expected = [TF.cross_entropy(torch.from_numpy(values), torch.from_numpy(labels)).item() for values in logits]
    assert loss.item() == pytest.approx(sum(expected), rel=1e-5)
    summary = objective.summarise(counts.numpy())
    assert (summary['best_block'], summary['best_acc1'], summary['acc1_block5']) == (5, 1.0, 1.0)
    assert summary['loss'] == pytest.approx(sum(expected), rel=1e-5) and summary['num_samples'] == 6
    for block, value in zip([2, 5, 7], expected):
        assert summary[f'loss_block{block}'] == pytest.approx(value, rel=1e-5)
        top1 = (logits[[2, 5, 7].index(block)].argmax(axis=1) == labels).mean()
        assert summary[f'acc1_block{block}'] == pytest.approx(top1)
    np.testing.assert_allclose(objective.evaluate_batch(FixedLogits(logits), batch, Amp()).numpy(), counts.numpy(),
                               rtol=1e-6)
    assert objective.logged == ('loss', 'best_acc1', 'best_block', 'acc1_block2', 'acc1_block5', 'acc1_block7')


@pytest.mark.parametrize('optimizer, kind', [('adamw', paddle.optimizer.AdamW), ('sgd', paddle.optimizer.Momentum)])
def test_optimizer_is_unilms_over_the_classifiers(optimizer, kind, data, tmp_path):
    """LR 1e-3 x total batch / 256, cosine from it to 0 with no warm-up; AdamW decay 1e-4, SGD momentum 0.9."""
    config = probe_config(data, tmp_path, '-accum_iter', '2', opts=['LINPROBE.OPTIMIZER', optimizer,
                                                                     'LINPROBE.NUM_EPOCHS', '4',
                                                                     'LINPROBE.BATCH_SIZE', '64'])
    assert (config.DATA.BATCH_SIZE, config.TRAIN.NUM_EPOCHS) == (64, 4)  # from LINPROBE
    probe = build_linear_probe(config)
    opt, scheduler, settings = build_probe_optimizer(config, probe, steps_per_epoch=5, world_size=2)
    assert isinstance(opt, kind) and len(opt._parameter_list) == 2 * len(probe.classifiers)
    peak = 1e-3 * 64 * 2 * 2 / 256
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_lr())
        scheduler.step()
    assert lrs[0] == pytest.approx(peak) and lrs[10] == pytest.approx(peak / 2) and scheduler.get_lr() == 0.0
    assert all(a > b for a, b in itertools.pairwise(lrs))
    if optimizer == 'sgd':
        assert opt._momentum == 0.9
    else:
        assert opt._weight_decay == 1e-4
    assert settings['classifiers.3.weight'] == {'lr_scale': 1.0, 'weight_decay': 1e-4}


def test_blocks_default_to_all_and_accept_negative_indices():
    config = get_config(TINY_CONFIG)
    assert probed_blocks(config) == [0, 1, 2, 3]
    config.LINPROBE.BLOCKS = [-1, 1, 3]
    assert probed_blocks(config) == [1, 3]


@pytest.mark.parametrize('opts, message', [
    (['LINPROBE.BLOCKS', '[4]'], 'LINPROBE.BLOCKS [4] for a model of MODEL.DEPTH 4 blocks: block index 4 is out of'),
    (['LINPROBE.BLOCKS', '[1.5]'], 'LINPROBE.BLOCKS [1.5]'),
    (['EVAL', 'True'], 'linear probing evaluates its classifiers every VALIDATE_FREQ epochs'),
    (['TRAIN.MODEL_EMA', 'True'], 'TRAIN.MODEL_EMA: linear probing keeps no EMA'),
    (['MODEL.TO_STATIC', 'True'], 'MODEL.TO_STATIC compiles forward'),
    (['MODEL.NUM_CLASSES', '0'], 'MODEL.NUM_CLASSES must be positive for linear probing'),
])
def test_unusable_probe_configs_name_the_key(opts, message, data, tmp_path):
    config = probe_config(data, tmp_path, opts=opts)
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace('.', r'\.')) as err:
        check_linear_probe_config(config)
    assert str(err.value).startswith(f'{opts[0]} from -opts, MODEL.DEPTH from {TINY_CONFIG}: ' if 'BLOCKS' in opts[0]
                                     else '-opts: ')
