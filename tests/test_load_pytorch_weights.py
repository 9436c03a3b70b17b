"""Conversion of PyTorch checkpoints, proved by comparing logits with timm's BEiT loading the same file."""
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
from timm.models.beit import checkpoint_filter_fn

import load_pytorch_weights
from beit import CheckpointMismatchError, build_beit
from beit_pretrain import build_beit_pretrain
from checkpoint import load_pretrained
from config import get_config
from helpers import ROOT, assert_output_untouched, assert_reads_as_paddle_load, existing_output, truncated, write_file
from load_pytorch_weights import convert_file, read_checkpoint
from timm_reference import (
    CHECKPOINT_FORMATS,
    PRETRAIN_SPEC,
    PRETRAIN_VOCAB,
    TINY,
    config_for,
    logits_difference,
    photo_batch,
    pretraining_checkpoint,
    random_batch,
    save_checkpoint,
    timm_model,
    timm_zoo_model,
    torch_state_dict,
    unilm_state_dict,
)
from torch_checkpoint import ConversionError
from transforms import get_val_transforms, host_normalise

TOLERANCE = 1e-4  # fp32, max abs logit difference

VARIANTS = {
    'default': {},
    'abs_pos_only': {'USE_ABS_POS_EMB': True, 'USE_REL_POS_BIAS': False},
    'shared_rel_pos': {'USE_REL_POS_BIAS': False, 'USE_SHARED_REL_POS_BIAS': True},
    'shared_and_per_block': {'USE_SHARED_REL_POS_BIAS': True, 'USE_ABS_POS_EMB': True},
    'no_layer_scale': {'INIT_VALUES': None},
    'layer_scale_init_zero': {'INIT_VALUES': 0.0},  # unilm's --layer_scale_init_value 0, timm's init_values=0
    'cls_pooling': {'USE_MEAN_POOLING': False},
    'no_qkv_bias': {'QKV_BIAS': False},
    'wider_deeper': {'EMBED_DIM': 48, 'DEPTH': 3, 'NUM_HEADS': 3, 'MLP_RATIO': 2.0, 'NUM_CLASSES': 11},
    'other_resolution': {'IMAGE_SIZE': 48, 'PATCH_SIZE': 16, 'NUM_CLASSES': 3},
}


def convert(tmp_path, spec, fmt='timm.safetensors', cfg_extra=None, source_spec=None, opts=()):
    """Save a random timm model as ``fmt``, convert it for ``spec``; returns (timm model, paddle model)."""
    reference = timm_model(source_spec or spec)
    src = tmp_path / f'checkpoint.{fmt}'
    save_checkpoint(torch_state_dict(reference), src, fmt)
    dst = tmp_path / 'converted.pdparams'
    cfg_file = tmp_path / 'model.yaml'
    config = config_for(spec, **(cfg_extra or {}))
    cfg_file.write_text(config.dump())
    convert_file(str(cfg_file), str(src), str(dst), opts)
    model = build_beit(config)
    model.set_state_dict(paddle.load(str(dst)))  # the way users load weights
    assert_reads_as_paddle_load(dst)  # and the way this project reads them
    return reference, model


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_converted_model_matches_timm(tmp_path, photo_paths, variant):
    spec = {**TINY, **VARIANTS[variant]}
    fmt = CHECKPOINT_FORMATS[sorted(VARIANTS).index(variant) % len(CHECKPOINT_FORMATS)]
    reference, model = convert(tmp_path, spec, fmt)
    size = spec['IMAGE_SIZE']
    for images in (random_batch(1, size), random_batch(5, size, seed=1), photo_batch(photo_paths[:1], size),
                   photo_batch(photo_paths[:5], size)):
        assert logits_difference(reference, model, images) <= TOLERANCE


@pytest.mark.slow  # BEiT-B built twice and converted: ~17 s on 2 cores
def test_full_size_base_round_trip(tmp_path, photo_paths):
    spec = {**TINY, 'IMAGE_SIZE': 224, 'PATCH_SIZE': 16, 'EMBED_DIM': 768, 'DEPTH': 12, 'NUM_HEADS': 12,
            'NUM_CLASSES': 1000}
    reference, model = convert(tmp_path, spec, 'unilm.pth', cfg_extra={'NAME': 'beit_base_patch16_224'})
    assert sum(p.numel() for p in reference.parameters()) == 86_530_984
    assert logits_difference(reference, model, photo_batch(photo_paths[:1], 224)) <= TOLERANCE
    assert logits_difference(reference, model, photo_batch(photo_paths[:5], 224)) <= TOLERANCE


@pytest.mark.slow  # BEiT-B and BEiT-L built and converted three times each: ~45 s on 2 cores
@pytest.mark.parametrize('timm_name, cfg_name, num_params, unilm_format, batch_size', [
    ('beitv2_base_patch16_224', 'beitv2_base_patch16_224_pt1k_ft1k', 86_530_984, 'unilm.pth', 2),
    ('beitv2_large_patch16_224', 'beitv2_large_patch16_224_pt1k_ft21kto1k', 304_430_568, 'deepspeed.pth', 1),
])
def test_beitv2_files_of_unilm_and_timm_give_timms_logits(tmp_path, photos, timm_name, cfg_name, num_params,
                                                           unilm_format, batch_size):
    """BEiT v2 at full size: unilm's file and timm's .pth and .safetensors convert to the same tensors without a
    note (nothing resampled or ignored; unilm's index buffers are left out, as always), and those in the zoo config's
    model give timm's logits on real photos prepared by the config's eval transform (ImageNet mean/std). One
    forward per model: large takes seconds on 2 cores."""
    reference = timm_zoo_model(timm_name)
    assert sum(p.numel() for p in reference.parameters()) == num_params
    config = get_config(str(ROOT / 'configs' / f'{cfg_name}.yaml'))
    model = build_beit(config)
    weights = _converted_file(tmp_path, unilm_state_dict(reference), unilm_format, model)
    for fmt in ('timm.pth', 'timm.safetensors'):
        other = _converted_file(tmp_path, torch_state_dict(reference), fmt, model)
        assert other.keys() == weights.keys() and all(np.array_equal(other[k], weights[k]) for k in weights), fmt
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in weights.items()})
    images = host_normalise(config)(np.stack([get_val_transforms(config)(photo) for photo in photos[:batch_size]]))
    assert logits_difference(reference, model, images, tokens=False) <= TOLERANCE


def _converted_file(tmp_path, state_dict: dict, fmt: str, model) -> dict:
    """``state_dict`` saved as ``fmt``, read back and converted for ``model`` (the file is removed: GBs at full size);
    the conversion must need no adaptation."""
    path = tmp_path / f'checkpoint.{fmt}'
    save_checkpoint(state_dict, path, fmt)
    weights, notes = load_pytorch_weights.convert_state_dict(read_checkpoint(str(path)), model)
    path.unlink()
    assert notes == [], notes
    return weights


def test_every_format_converts_to_the_same_weights(tmp_path):
    reference = timm_model(TINY)
    model = build_beit(config_for(TINY))
    converted = []
    for fmt in CHECKPOINT_FORMATS:
        save_checkpoint(torch_state_dict(reference), tmp_path / f'c.{fmt}', fmt)
        tensors = read_checkpoint(str(tmp_path / f'c.{fmt}'))
        converted.append(load_pytorch_weights.convert_state_dict(tensors, model)[0])
    for other in converted[1:]:
        assert other.keys() == converted[0].keys()
        for name in other:
            np.testing.assert_array_equal(other[name], converted[0][name])


def test_bfloat16_safetensors_are_widened(tmp_path):
    reference = timm_model(TINY).to(torch.bfloat16)
    save_checkpoint(torch_state_dict(reference), tmp_path / 'c.safetensors', 'timm.safetensors')
    tensors = read_checkpoint(str(tmp_path / 'c.safetensors'))
    expected = reference.state_dict()['blocks.0.attn.qkv.weight'].float().numpy()
    assert tensors['blocks.0.attn.qkv.weight'].dtype == np.float32
    np.testing.assert_array_equal(tensors['blocks.0.attn.qkv.weight'], expected)


def test_safetensors_read_without_torch(tmp_path, monkeypatch):
    save_checkpoint(torch_state_dict(timm_model(TINY)), tmp_path / 'c.safetensors', 'timm.safetensors')
    save_checkpoint(torch_state_dict(timm_model(TINY)), tmp_path / 'c.pth', 'timm.pth')
    monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
    assert 'cls_token' in read_checkpoint(str(tmp_path / 'c.safetensors'))
    with pytest.raises(ConversionError, match='needs PyTorch'):
        read_checkpoint(str(tmp_path / 'c.pth'))


def test_head_of_another_class_count_is_dropped(tmp_path, capsys):
    reference, model = convert(tmp_path, {**TINY, 'NUM_CLASSES': 5}, source_spec=TINY)
    assert 'dropped head.weight' in capsys.readouterr().out
    assert 'head.weight' not in paddle.load(str(tmp_path / 'converted.pdparams'))
    features = reference.forward_head(reference.forward_features(torch.from_numpy(random_batch(2, 32))),
                                      pre_logits=True).detach().numpy()
    with paddle.no_grad():
        ours = model.eval().forward_features(paddle.to_tensor(random_batch(2, 32))).numpy()
    np.testing.assert_allclose(ours, features, atol=TOLERANCE)


def test_pretraining_checkpoint_spreads_shared_bias(tmp_path, capsys):
    """unilm's pre-training layout (shared bias, mask token, lm head, final norm) into a fine-tuning model."""
    pretrain_spec = {**TINY, 'USE_REL_POS_BIAS': False, 'USE_SHARED_REL_POS_BIAS': True}
    reference = timm_model(pretrain_spec)
    state = torch_state_dict(reference)
    state['mask_token'] = torch.zeros(1, 1, TINY['EMBED_DIM'])
    state['lm_head.weight'] = torch.randn(8192, TINY['EMBED_DIM'])
    state['lm_head.bias'] = torch.zeros(8192)
    state['norm.weight'] = torch.ones(TINY['EMBED_DIM'])
    state['norm.bias'] = torch.zeros(TINY['EMBED_DIM'])
    save_checkpoint(state, tmp_path / 'pt.pth', 'unilm.pth')
    cfg_file = tmp_path / 'ft.yaml'
    cfg_file.write_text(config_for(TINY).dump())
    convert_file(str(cfg_file), str(tmp_path / 'pt.pth'), str(tmp_path / 'ft.pdparams'))
    assert 'copied the shared relative position bias into 2 blocks' in capsys.readouterr().out
    weights = paddle.load(str(tmp_path / 'ft.pdparams'))
    shared = state['rel_pos_bias.relative_position_bias_table'].numpy()
    for block in range(TINY['DEPTH']):
        np.testing.assert_array_equal(weights[f'blocks.{block}.attn.relative_position_bias_table'].numpy(), shared)
    assert not any(name.startswith(('mask_token', 'lm_head', 'rel_pos_bias')) for name in weights)
    model = build_beit(config_for(TINY))
    model.set_state_dict(weights)
    assert logits_difference(reference, model, random_batch(3, 32)) <= TOLERANCE


@pytest.mark.parametrize('abs_pos', [False, True])
def test_resolution_change_matches_timm_resampling(tmp_path, abs_pos):
    """A 224 checkpoint into a 384 model: tables and logits agree with timm's own resampling (linear mode)."""
    low = {**TINY, 'IMAGE_SIZE': 224, 'PATCH_SIZE': 16, 'USE_ABS_POS_EMB': abs_pos}
    high = {**low, 'IMAGE_SIZE': 384}
    reference_224, model = convert(tmp_path, high, source_spec=low, cfg_extra={'REL_POS_INTERP': 'linear'})
    timm_384 = timm_model(high, seed=1)
    # unilm resizes pos_embed with plain bicubic; timm's default adds antialiasing, so turn it off to compare.
    filtered = checkpoint_filter_fn(torch_state_dict(reference_224), timm_384, antialias=False)
    timm_384.load_state_dict(filtered)
    ours = model.state_dict()
    for name in filtered:
        if name.endswith('relative_position_bias_table') or name == 'pos_embed':
            assert tuple(ours[name].shape) == tuple(filtered[name].shape)
            np.testing.assert_allclose(ours[name].numpy(), filtered[name].numpy(), atol=1e-5, err_msg=name)
    assert logits_difference(timm_384, model, random_batch(2, 384)) <= TOLERANCE


def test_cubic_resampling_is_the_default_and_differs_from_linear(tmp_path):
    low = {**TINY, 'IMAGE_SIZE': 224, 'PATCH_SIZE': 16}
    _, cubic = convert(tmp_path, {**low, 'IMAGE_SIZE': 384}, source_spec=low)
    _, linear = convert(tmp_path, {**low, 'IMAGE_SIZE': 384}, source_spec=low, cfg_extra={'REL_POS_INTERP': 'linear'})
    name = 'blocks.0.attn.relative_position_bias_table'
    cubic_table, linear_table = cubic.state_dict()[name].numpy(), linear.state_dict()[name].numpy()
    np.testing.assert_array_equal(cubic_table[-3:], linear_table[-3:])  # cls relations are copied
    assert np.abs(cubic_table - linear_table).max() > 1e-3


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'load_pytorch_weights.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def tiny_cfg(tmp_path):
    cfg_file = tmp_path / 'tiny.yaml'
    cfg_file.write_text(config_for(TINY).dump())
    return cfg_file


@pytest.mark.slow
def test_cli_converts_and_checks_against_timm(tmp_path, tiny_cfg):
    save_checkpoint(torch_state_dict(timm_model(TINY)), tmp_path / 'c.pth', 'unilm.pth')
    result = run_cli('-cfg', tiny_cfg, '-src', tmp_path / 'c.pth', '-dst', tmp_path / 'out.pdparams', '-check')
    assert result.returncode == 0, result.stderr
    assert 'max abs logit difference to timm' in result.stdout
    assert (tmp_path / 'out.pdparams').is_file()


BAD_SOURCES = {
    'missing file': (lambda tmp: tmp / 'nope.pth', 'checkpoint not found'),
    'text file': (lambda tmp: write_file(tmp / 'notes.pth', b'these are not weights\n'), 'not a readable PyTorch'),
    'truncated pth': (lambda tmp: truncated(_saved(tmp, TINY, 'c.pth', 'unilm.pth')), 'not a readable PyTorch'),
    'truncated safetensors': (lambda tmp: truncated(_saved(tmp, TINY, 'c.safetensors', 'timm.safetensors')),
                              'truncated'),
    'text safetensors': (lambda tmp: write_file(tmp / 'x.safetensors', b'{"a": 1}' * 3), 'not a safetensors'),
    'wider model': (lambda tmp: _saved(tmp, {**TINY, 'EMBED_DIM': 64}, 'w.pth', 'timm.pth'),
                    'does not fit the model shape'),
    'deeper model': (lambda tmp: _saved(tmp, {**TINY, 'DEPTH': 3}, 'd.pth', 'timm.pth'), 'no place in the model'),
    'shallower model': (lambda tmp: _saved(tmp, {**TINY, 'DEPTH': 1}, 's.pth', 'timm.pth'),
                        'missing from the checkpoint'),
    'not a state dict': (lambda tmp: _torch_save(tmp / 'n.pth', {'epoch': 3}), 'no state dict of tensors'),
    'empty file': (lambda tmp: write_file(tmp / 'e.pth', b''), 'not a readable PyTorch checkpoint: EOFError'),
    'whole pickled model': (lambda tmp: _torch_save(tmp / 'm.pth', timm_model(TINY)),
                            'it pickles timm.models.beit.Beit, which is not unpickled here (if you trust the file, '
                            'add -trust_pickle)'),
}


def _saved(tmp, spec, name, fmt):
    save_checkpoint(torch_state_dict(timm_model(spec)), tmp / name, fmt)
    return tmp / name


def _torch_save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(BAD_SOURCES))
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, tiny_cfg, case):
    make_source, message = BAD_SOURCES[case]
    src = make_source(tmp_path)
    dst = existing_output(tmp_path)
    result = run_cli('-cfg', tiny_cfg, '-src', src, '-dst', dst)
    assert result.returncode != 0
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
    assert_output_untouched(dst)


def test_mismatch_error_names_the_tensor(tmp_path):
    model = build_beit(config_for(TINY))
    tensors = torch_state_dict(timm_model({**TINY, 'NUM_HEADS': 4}))  # only the bias tables differ
    expected = r'blocks.0.attn.relative_position_bias_table: checkpoint shape \[52, 4\] does not fit .*\[52, 2\]'
    with pytest.raises(CheckpointMismatchError, match=expected):
        load_pytorch_weights.convert_state_dict({k: v.numpy() for k, v in tensors.items()}, model)


# unilm's Linear weights ([out, in]); everything else keeps its layout (patch_embed.proj is a convolution)
LINEAR_WEIGHTS = ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight', 'lm_head.weight')


@pytest.mark.slow
def test_unilm_pretraining_checkpoint_round_trips_into_the_mim_model_and_fine_tuning(tmp_path):
    """unilm names -> -mim conversion (checked against timm's encoder) -> our pre-training model, tensor for
    tensor; the same file -> -pretrained start of fine-tuning with the shared table in every block."""
    _, state = pretraining_checkpoint()
    save_checkpoint(state, tmp_path / 'pt22k.pth', 'unilm.pth')
    config = config_for(PRETRAIN_SPEC)
    config.PRETRAIN.VOCAB_SIZE = PRETRAIN_VOCAB
    (tmp_path / 'pretrain.yaml').write_text(config.dump())
    result = run_cli('-mim', '-check', '-cfg', tmp_path / 'pretrain.yaml', '-src', tmp_path / 'pt22k.pth',
                     '-dst', tmp_path / 'pt22k.pdparams')
    assert result.returncode == 0, result.stderr
    difference = float(re.search(r'max abs token difference to timm: (\S+)', result.stdout).group(1))
    assert difference <= TOLERANCE
    model = build_beit_pretrain(config)
    model.set_state_dict(paddle.load(str(tmp_path / 'pt22k.pdparams')))
    ours = {name: value.numpy() for name, value in model.state_dict().items()}
    assert set(ours) == {name for name in state if not name.endswith('relative_position_index')}
    for name, value in ours.items():
        expected = state[name].numpy()
        np.testing.assert_array_equal(value, expected.T if name.endswith(LINEAR_WEIGHTS) else expected, name)

    fine_tuning = build_beit(config_for(TINY))
    notes, _ = load_pretrained(fine_tuning, str(tmp_path / 'pt22k.pdparams'), use_ema=False, rel_pos_interp='cubic')
    assert 'copied the shared relative position bias into 2 blocks' in notes
    shared = state['rel_pos_bias.relative_position_bias_table'].numpy()
    for block in fine_tuning.blocks:
        np.testing.assert_array_equal(block.attn.relative_position_bias_table.numpy(), shared)
    np.testing.assert_array_equal(fine_tuning.blocks[1].mlp.fc2.weight.numpy(), state['blocks.1.mlp.fc2.weight'].T)
    assert any('fc_norm' in note for note in notes) and any('ignored norm.weight' in note for note in notes)


def test_whole_pickled_model_converts_when_trusted(tmp_path, tiny_cfg):
    reference = timm_model(TINY)
    torch.save(reference, tmp_path / 'model.pth')
    convert_file(str(tiny_cfg), str(tmp_path / 'model.pth'), str(tmp_path / 'out.pdparams'), trust_pickle=True)
    model = build_beit(config_for(TINY))
    model.set_state_dict(paddle.load(str(tmp_path / 'out.pdparams')))
    assert logits_difference(reference, model, random_batch(2, 32)) <= TOLERANCE
