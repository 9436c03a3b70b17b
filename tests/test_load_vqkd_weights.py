"""load_vqkd_weights.py: unilm-style VQ-KD files (random weights, the released layout) convert to a tokenizer with
the reference's features and ids, -check passing; anything else stops with the file named and nothing written."""
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
from timm.models.beit import Beit

import load_vqkd_weights
from dalle_reference import TINY as DALLE_TINY
from dalle_reference import openai_encoder
from helpers import ROOT, assert_output_untouched, assert_reads_as_paddle_load, existing_output, truncated, write_file
from load_vqkd_weights import main
from test_vqkd_tokenizer import FEATURE_TOLERANCE, compare
from vqkd_reference import TINY, UnilmVQKD, random_images
from vqkd_tokenizer import build_vqkd_tokenizer

INFERENCE_PREFIXES = ('encoder.', 'encode_task_layer.', 'quantize.embedding.weight')


def save_like_unilm(path, state_dict: dict, wrapper: str = 'model'):
    torch.save({wrapper: state_dict}, path)
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'load_vqkd_weights.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize('wrapper', ['model', 'state_dict'])  # unilm's loader takes either
def test_unilm_style_file_converts_with_check(tmp_path, capsys, wrapper):
    reference = UnilmVQKD(**TINY)
    released = reference.unilm_state_dict()
    src = save_like_unilm(tmp_path / 'vqkd.pth', released, wrapper)
    dst = tmp_path / 'vqkd.pdparams'
    assert main(['-src', str(src), '-dst', str(dst), '-check', '-num_heads', '4']) == 0
    out = capsys.readouterr().out
    assert ('VQ-KD tokenizer: img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, '
            'mlp_ratio=4, codebook_size=1024, codebook_dim=32') in out
    for dropped in ('the decoder (tokenizer training): 19 tensors', 'the decoder\'s task layer (tokenizer training): '
                    '4 tensors', 'the codebook\'s EMA statistics: 4 tensors (quantize.embedding.cluster_size, '
                    'quantize.embedding.embed_avg, ...)', 'the teacher: 1 tensors (teacher_model.visual.proj)',
                    'the teacher\'s input scaling: 2 tensors'):
        assert f'dropped {dropped}' in out
    difference = float(re.search(r'max abs normalised feature difference to timm-built unilm VQ-KD: (\S+) ',
                                 out).group(1))
    assert difference <= FEATURE_TOLERANCE
    kept = sorted(name for name in released if name.startswith(INFERENCE_PREFIXES))
    assert f'wrote {len(kept)} tensors to {dst}' in out
    assert_reads_as_paddle_load(dst)
    assert sorted(paddle.load(str(dst))) == kept
    tokenizer = build_vqkd_tokenizer(str(dst), **TINY)
    difference, _, _ = compare(reference, tokenizer, random_images(16, TINY['img_size'], seed=7))
    assert difference <= FEATURE_TOLERANCE


def test_check_above_tolerance_writes_nothing(tmp_path, capsys, monkeypatch):
    real = load_vqkd_weights.timm_reference_features
    monkeypatch.setattr(load_vqkd_weights, 'timm_reference_features', lambda *args: real(*args) + 1e-3)
    src = save_like_unilm(tmp_path / 'vqkd.pth', UnilmVQKD(**TINY).unilm_state_dict())
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst), '-check', '-num_heads', '4']) == 2
    assert re.search(rf'error: outputs differ from timm-built unilm VQ-KD by 0.001\d*; {dst} not written',
                     capsys.readouterr().err)
    assert_output_untouched(dst)


def test_written_tensors_do_not_depend_on_the_head_count(tmp_path):
    """The head count is not in the shapes and -num_heads serves -check only (whose reference uses it too, so it
    cannot catch a wrong one): the file is the same, and build_vqkd_tokenizer's num_heads decides."""
    src = save_like_unilm(tmp_path / 'vqkd.pth', _tiny_released())
    for heads in (4, 8):
        assert main(['-src', str(src), '-dst', str(tmp_path / f'{heads}.pdparams'), '-num_heads', str(heads)]) == 0
    four, eight = (paddle.load(str(tmp_path / f'{heads}.pdparams'), return_numpy=True) for heads in (4, 8))
    assert four.keys() == eight.keys()
    for name, value in four.items():
        np.testing.assert_array_equal(value, eight[name], err_msg=name)


def _tiny_released():
    return UnilmVQKD(**TINY).unilm_state_dict()


def _beit_classifier():
    return Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).state_dict()


BAD_SOURCES = {
    'missing file': (lambda tmp: tmp / 'nope.pth', 'checkpoint not found: {src}'),
    'empty file': (lambda tmp: write_file(tmp / 'e.pth', b''), '{src}: not a readable PyTorch checkpoint'),
    'truncated file': (lambda tmp: truncated(save_like_unilm(tmp / 't.pth', _tiny_released())),
                       '{src}: not a readable PyTorch checkpoint'),
    'a BEiT classifier': (lambda tmp: save_like_unilm(tmp / 'beit.pth', _beit_classifier()),
                          r'{src}: not a VQ-KD tokenizer of unilm\'s beit2 \(no encoder.patch_embed.proj.weight, '
                          r'encoder.pos_embed, .* among its \d+ tensors, e.g. cls_token'),
    'a DALL-E encoder state dict': (lambda tmp: save_like_unilm(tmp / 'dalle.pth',
                                                                openai_encoder(**DALLE_TINY).state_dict()),
                                    r'{src}: not a VQ-KD tokenizer .* e.g. blocks.input.w'),
    'a pickled DALL-E encoder': (lambda tmp: torch.save(openai_encoder(**DALLE_TINY), tmp / 'encoder.pkl')
                                 or tmp / 'encoder.pkl', r'{src}: .* it pickles dall_e.encoder.Encoder'),
    'an unknown tensor': (lambda tmp: save_like_unilm(tmp / 'u.pth', {**_tiny_released(),
                                                                      'lm_head.weight': torch.ones(2, 2)}),
                          r"{src}: 1 tensors of no part of a VQ-KD tokenizer: \['lm_head.weight'\]"),
    'a missing tensor': (lambda tmp: save_like_unilm(tmp / 'm.pth', {
        name: value for name, value in _tiny_released().items() if name != 'encoder.blocks.1.mlp.fc2.bias'}),
        r"{src}: not the tensors of this VQ-KD tokenizer: 1 missing \['encoder.blocks.1.mlp.fc2.bias'\]"),
    'a task layer of another width': (lambda tmp: save_like_unilm(tmp / 'w.pth', {
        **_tiny_released(), 'encode_task_layer.2.weight': torch.ones(16, 64)}),
        r'{src}: encode_task_layer.2.weight has shape \[64, 16\], this VQ-KD tokenizer needs \[64, 32\]'),
}


@pytest.mark.parametrize('case', sorted(BAD_SOURCES))
def test_bad_source_fails_clearly_and_writes_nothing(tmp_path, capsys, case):
    make_source, message = BAD_SOURCES[case]
    src = make_source(tmp_path)
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst), '-num_heads', '4']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert re.search(message.format(src=re.escape(str(src))), err), err
    assert_output_untouched(dst)


def test_head_count_that_does_not_divide_the_width_is_refused(tmp_path, capsys):
    src = save_like_unilm(tmp_path / 'vqkd.pth', _tiny_released())
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst), '-num_heads', '3']) == 2
    assert 'width 64 is not divisible by -num_heads 3' in capsys.readouterr().err
    assert_output_untouched(dst)


@pytest.mark.slow
def test_cli_converts_and_refuses_in_one_line(tmp_path):
    src = save_like_unilm(tmp_path / 'vqkd.pth', _tiny_released())
    dst = tmp_path / 'vqkd.pdparams'
    result = run_cli('-src', src, '-dst', dst, '-check', '-num_heads', '4')
    assert result.returncode == 0, result.stderr
    assert f'wrote 37 tensors to {dst}' in result.stdout
    foreign = save_like_unilm(tmp_path / 'beit.pth', _beit_classifier())
    result = run_cli('-src', foreign, '-dst', tmp_path / 'out.pdparams')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        f'error: {foreign}: not a VQ-KD tokenizer of unilm\'s beit2 (no encoder.patch_embed.proj.weight, '
        'encoder.pos_embed, encoder.blocks.0.mlp.fc1.weight, encode_task_layer.2.weight, quantize.embedding.weight '
        'among its 34 tensors, e.g. cls_token, pos_embed, patch_embed.proj.weight)']
    assert not (tmp_path / 'out.pdparams').exists()
    np.testing.assert_array_equal(paddle.load(str(dst))['quantize.embedding.weight'].numpy(),
                                  _tiny_released()['quantize.embedding.weight'].numpy())
