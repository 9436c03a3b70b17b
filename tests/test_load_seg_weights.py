"""load_seg_weights.py: unilm's mmseg files and transformers' files converted to the segmentor, proved against
transformers' BeitForSemanticSegmentation; round trips; foreign or mismatched files refused with nothing written."""
import collections

import numpy as np
import paddle
import torch
import yaml
from safetensors.numpy import load_file, save_file

import load_seg_weights
import seg_checkpoints
from beit import relative_position_index
from beit_seg import build_beit_upernet
from helpers import assert_output_untouched, existing_output
from seg_checkpoints import transformers_config, transformers_logits, unilm_to_transformers
from seg_reference import TINY, images, paddle_logits, random_model, random_state, seg_config

TOLERANCE = 1e-4
LINEAR_SUFFIXES = ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight')


def write_config(tmp_path, size: int, spec: dict) -> str:
    nested = {'DATA': {'IMAGE_SIZE': size}}
    for key, value in spec.items():
        group, name = key.split('.')
        nested.setdefault(group, {})[name] = value
    path = tmp_path / 'seg.yaml'
    path.write_text(yaml.safe_dump(nested))
    return str(path)


def unilm_checkpoint(path, state: dict, grid: tuple[int, int]) -> dict:
    """A file as unilm's mmseg 0.11 saves it (meta, state_dict of the EncoderDecoder in PyTorch layout, optimizer),
    written from our Paddle ``state``; returns its state dict."""
    torch_state = collections.OrderedDict()
    for name, value in state.items():
        if name.endswith(LINEAR_SUFFIXES):
            value = value.T
        if name.endswith('._mean'):
            name = name[:-len('_mean')] + 'running_mean'
        elif name.endswith('._variance'):
            name = name[:-len('_variance')] + 'running_var'
            torch_state[name[:-len('running_var')] + 'num_batches_tracked'] = torch.tensor(160000)
        torch_state[name] = torch.from_numpy(np.ascontiguousarray(value))
        if name.endswith('attn.relative_position_bias_table'):
            index_name = name.replace('relative_position_bias_table', 'relative_position_index')
            torch_state[index_name] = torch.from_numpy(relative_position_index(grid))
    meta = {'mmcv_version': '1.3.0', 'iter': 160000, 'CLASSES': ('wall', 'building'), 'PALETTE': [[120, 120, 120]]}
    torch.save({'meta': meta, 'state_dict': torch_state, 'optimizer': {'state': {}, 'param_groups': []}}, path)
    return {name: value.numpy() for name, value in torch_state.items()}


def transformers_checkpoint(folder, config, seed: int = 0):
    """transformers' own random BeitForSemanticSegmentation (BatchNorm statistics, layer scales, biases and bias
    tables randomised, the blocks' Linear weights N(0, 1/fan_in): see seg_reference.random_state), saved with its
    save_pretrained; returns the model, pointed at unilm's blocks."""
    from transformers import BeitForSemanticSegmentation
    torch.manual_seed(seed)
    reference = BeitForSemanticSegmentation(transformers_config(config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            if name.endswith(('_proj.weight', 'fc1.weight', 'fc2.weight')):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * tensor.shape[1] ** -0.5)
            elif name.endswith(('running_var', 'normalization.weight', 'lambda_1', 'lambda_2')):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(('running_mean', 'bias', 'relative_position_bias_table')):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
    reference.save_pretrained(folder)
    reference.config._out_indices = [block + 2 for block in config.SEG.OUT_INDICES]
    return reference


def load_converted(config, path) -> tuple:
    model = build_beit_upernet(config)
    state = paddle.load(str(path))
    model.set_state_dict(state)
    return model.eval(), {name: tensor.numpy() for name, tensor in state.items()}


def test_unilm_checkpoint_converts_checks_and_round_trips(tmp_path, capsys):
    config = seg_config(64, TINY)
    _, state = random_model(config)
    source = unilm_checkpoint(tmp_path / 'upernet.pth', state, (4, 4))
    dst = tmp_path / 'seg.pdparams'
    assert load_seg_weights.main(['-cfg', write_config(tmp_path, 64, TINY), '-src', str(tmp_path / 'upernet.pth'),
                                  '-dst', str(dst), '-check']) == 0
    out = capsys.readouterr().out
    assert "as unilm's layout" in out and 'difference to transformers' in out
    _, converted = load_converted(config, dst)
    assert set(converted) == set(state)
    for name, value in state.items():  # round trip: the file's tensors, back in our layout
        np.testing.assert_array_equal(converted[name], value, err_msg=name)
    assert len(source) == len(state) + 14 + 4  # + num_batches_tracked of 14 BatchNorms, index buffers of 4 blocks


def test_transformers_checkpoint_converts_equals_transformers_and_round_trips(tmp_path):
    config = seg_config(64, TINY)
    reference = transformers_checkpoint(tmp_path / 'hf', config)
    dst = tmp_path / 'seg.pdparams'
    assert load_seg_weights.main(['-cfg', write_config(tmp_path, 64, TINY), '-src',
                                  str(tmp_path / 'hf' / 'model.safetensors'), '-dst', str(dst), '-check']) == 0
    model, converted = load_converted(config, dst)
    batch = images(config, batch=2)
    for actual, expected in zip(paddle_logits(model, batch), transformers_logits(reference, batch)):
        assert np.abs(actual - expected).max() < TOLERANCE
    original = load_file(str(tmp_path / 'hf' / 'model.safetensors'))
    back = unilm_to_transformers(converted, model)
    assert set(back) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_unilm_checkpoint_at_another_crop_is_resampled_without_check(tmp_path, capsys):
    config = seg_config(64, TINY)
    _, state = random_model(config)
    unilm_checkpoint(tmp_path / 'upernet.pth', state, (4, 4))
    cfg = write_config(tmp_path, 128, TINY)
    args = ['-cfg', cfg, '-src', str(tmp_path / 'upernet.pth'), '-dst', str(tmp_path / 'seg.pdparams')]
    output = existing_output(tmp_path)
    assert load_seg_weights.main([*args[:-1], str(output), '-check']) == 2
    assert '-check compares at the checkpoint' in capsys.readouterr().err
    assert_output_untouched(output)
    assert load_seg_weights.main(args) == 0
    assert 'resampled blocks.0.attn.relative_position_bias_table from 52 to 228 rows' in capsys.readouterr().out


def _refused(tmp_path, src, cfg, capsys, *extra) -> str:
    output = existing_output(tmp_path)
    assert load_seg_weights.main(['-cfg', cfg, '-src', str(src), '-dst', str(output), *extra]) == 2
    assert_output_untouched(output)
    return capsys.readouterr().err


def test_a_classification_checkpoint_is_refused(tmp_path, capsys):
    names = {'cls_token': np.zeros([1, 1, 32], np.float32), 'blocks.0.attn.qkv.weight': np.zeros([96, 32], np.float32),
             'head.weight': np.zeros([5, 32], np.float32)}
    save_file(names, str(tmp_path / 'classifier.safetensors'))
    err = _refused(tmp_path, tmp_path / 'classifier.safetensors', write_config(tmp_path, 64, TINY), capsys)
    assert 'not a BEiT segmentation checkpoint' in err and 'cls_token' in err and '-pretrained' in err


def test_transformers_in_memory_names_are_refused(tmp_path, capsys):
    """transformers 5 renames on loading; files hold the older names. A state_dict() saved by hand is refused."""
    config = seg_config(64, TINY)
    reference = transformers_checkpoint(tmp_path / 'hf', config)
    torch.save(reference.state_dict(), tmp_path / 'in_memory.bin')
    err = _refused(tmp_path, tmp_path / 'in_memory.bin', write_config(tmp_path, 64, TINY), capsys)
    assert 'neither backbone nor head tensors' in err and 'beit.layers.0' in err


def test_a_checkpoint_of_other_heads_is_refused(tmp_path, capsys):
    config = seg_config(64, TINY)
    _, state = random_model(config)
    unilm_checkpoint(tmp_path / 'upernet.pth', state, (4, 4))
    err = _refused(tmp_path, tmp_path / 'upernet.pth',
                   write_config(tmp_path, 64, {**TINY, 'SEG.NUM_CLASSES': 150}), capsys)
    assert 'decode_head.conv_seg.weight' in err and 'SEG.NUM_CLASSES' in err


def test_a_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    config = seg_config(64, TINY)
    model = build_beit_upernet(config)
    unilm_checkpoint(tmp_path / 'upernet.pth', random_state(model), (4, 4))
    shifted = seg_checkpoints.transformers_logits

    def off_by_a_little(reference, batch):
        main, aux = shifted(reference, batch)
        return main + 1e-3, aux

    monkeypatch.setattr(load_seg_weights, 'transformers_logits', off_by_a_little)
    err = _refused(tmp_path, tmp_path / 'upernet.pth', write_config(tmp_path, 64, TINY), capsys, '-check')
    assert 'outputs differ from transformers' in err
