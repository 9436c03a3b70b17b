"""load_dalle_weights.py: OpenAI-style pickles of the dall_e package's encoder (random weights) convert to a
tokenizer with the same logits and ids; anything else stops with the file named and nothing written."""
import pickle
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch

from dalle_reference import (
    TINY,
    compare_with_openai,
    numpy_state_dict,
    openai_decoder,
    openai_encoder,
    photo_batch,
    random_batch,
)
from dalle_tokenizer import build_tokenizer
from helpers import ROOT, assert_output_untouched, assert_reads_as_paddle_load, existing_output, truncated, write_file
from load_dalle_weights import main

TOLERANCE = 1e-4  # fp32, max abs logit difference


def save_like_openai(encoder: torch.nn.Module, path, fmt: str):
    """encoder.pkl is torch.save of the whole module; 'legacy' is torch's format before 1.6 (no zip)."""
    zipped = not fmt.endswith('legacy')
    obj = encoder.state_dict() if fmt.startswith('state dict') else encoder
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'load_dalle_weights.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_full_size_encoder_pickle_converts_with_the_cli(tmp_path, photo_paths):
    """OpenAI's size (53.8M parameters; random inputs are covered by the smaller sizes, to keep this fast)."""
    reference = openai_encoder()
    src = save_like_openai(reference, tmp_path / 'encoder.pkl', 'module')
    dst = tmp_path / 'encoder.pdparams'
    result = run_cli('-src', src, '-dst', dst)
    assert result.returncode == 0, result.stderr
    assert 'n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192' in result.stdout
    difference, id_agreement = compare_with_openai(reference, build_tokenizer(str(dst)), photo_batch(photo_paths))
    print(f'full size: max abs logit difference {difference:.3g}, ids equal {id_agreement:.2%}')
    assert difference <= TOLERANCE
    assert id_agreement >= 0.99


@pytest.mark.parametrize('fmt', ['module', 'module legacy', 'state dict', 'state dict legacy'])
def test_tiny_encoder_converts_from_every_format(tmp_path, capsys, photo_paths, fmt):
    reference = openai_encoder(**TINY, seed=1)
    src = save_like_openai(reference, tmp_path / 'encoder.pkl', fmt)
    dst = tmp_path / 'tiny.pdparams'
    assert main(['-src', str(src), '-dst', str(dst)]) == 0
    assert f'n_hid=16, n_blk_per_group=2, input_channels=3, vocab_size=512) to {dst}' in capsys.readouterr().out
    converted = paddle.load(str(dst))
    assert_reads_as_paddle_load(dst)
    expected = numpy_state_dict(reference)
    assert converted.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(converted[name].numpy(), value, err_msg=name)
    tokenizer = build_tokenizer(str(dst))
    for images in (photo_batch(photo_paths), random_batch(4, seed=2)):
        difference, id_agreement = compare_with_openai(reference, tokenizer, images)
        assert difference <= TOLERANCE
        assert id_agreement >= 0.99


def _tiny_state_dict():
    return openai_encoder(**TINY).state_dict()


def _torch_save(path, obj, zipped=True):
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    return path


BAD_SOURCES = {
    'missing file': (lambda tmp: tmp / 'nope.pkl', 'checkpoint not found: {src}'),
    'empty file': (lambda tmp: write_file(tmp / 'e.pkl', b''), '{src}: not a readable PyTorch checkpoint'),
    'text file': (lambda tmp: write_file(tmp / 't.pkl', b'these are not weights\n'), '{src}: not a readable PyTorch'),
    'truncated pickle': (lambda tmp: truncated(save_like_openai(openai_encoder(**TINY), tmp / 'c.pkl', 'module')),
                         '{src}: not a readable PyTorch checkpoint'),
    'truncated legacy pickle': (lambda tmp: truncated(save_like_openai(openai_encoder(**TINY), tmp / 'c.pkl',
                                                                        'module legacy')),
                                '{src}: not a readable PyTorch checkpoint'),
    'plain python pickle': (lambda tmp: write_file(tmp / 'p.pkl', pickle.dumps({'w': np.ones(3)})),
                            '{src}: not a readable PyTorch checkpoint'),
    'another module': (lambda tmp: _torch_save(tmp / 'm.pkl', torch.nn.Conv2d(3, 4, 7)),
                       '{src}: not a readable PyTorch checkpoint: it pickles torch.nn.modules.conv.Conv2d'),
    'another legacy module': (lambda tmp: _torch_save(tmp / 'm.pkl', torch.nn.Linear(3, 4), zipped=False),
                              'it pickles torch.nn.modules.linear.Linear'),
    'the decoder': (lambda tmp: _torch_save(tmp / 'decoder.pkl', openai_decoder(n_hid=16, n_init=32, vocab_size=512)),
                    r'{src}: blocks.input.w has shape \[32, 512, 1, 1\].*the DALL-E decoder: convert encoder.pkl'),
    'not a state dict': (lambda tmp: _torch_save(tmp / 'n.pkl', {'epoch': 3}), '{src}: no state dict of tensors'),
    'another state dict': (lambda tmp: _torch_save(tmp / 's.pkl', torch.nn.Conv2d(3, 4, 7).state_dict()),
                           '{src}: not a DALL-E encoder'),
    'wrong shape': (lambda tmp: _torch_save(tmp / 'w.pkl', {**_tiny_state_dict(),
                                                            'blocks.output.conv.b': torch.ones(7)}),
                    r'{src}: blocks.output.conv.b has shape \[7\], a DALL-E encoder needs \[512\]'),
    'no groups': (lambda tmp: _torch_save(tmp / 'g.pkl', {
        name: value for name, value in _tiny_state_dict().items() if not name.startswith('blocks.group_')}),
        r'{src}: not a DALL-E encoder \(group_count, .* must be at least 1, got 0, 0, 3, 512\)'),
    'missing tensor': (lambda tmp: _torch_save(tmp / 'm.pkl', {
        name: value for name, value in _tiny_state_dict().items() if name != 'blocks.group_4.block_1.id_path.w'}),
        r"{src}: not the tensors of a DALL-E encoder: 1 missing \['blocks.group_4.block_1.id_path.w'\]"),
}


@pytest.mark.parametrize('case', sorted(BAD_SOURCES))
def test_bad_source_fails_clearly_and_writes_nothing(tmp_path, capsys, case):
    make_source, message = BAD_SOURCES[case]
    src = make_source(tmp_path)
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert re.search(message.format(src=src), err), err
    assert_output_untouched(dst)


@pytest.mark.slow
def test_cli_failure_is_one_line_without_traceback(tmp_path):
    src = _torch_save(tmp_path / 'model.pkl', torch.nn.Conv2d(3, 4, 7))
    result = run_cli('-src', src, '-dst', tmp_path / 'out.pdparams')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert errors == [f'error: {src}: not a readable PyTorch checkpoint: it pickles torch.nn.modules.conv.Conv2d, '
                      'which is not unpickled here']
    assert not (tmp_path / 'out.pdparams').exists()
