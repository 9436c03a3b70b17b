"""load_clip_weights.py: OpenAI-style CLIP files (random weights; the TorchScript archive OpenAI releases and plain
state dicts) convert to a teacher with unilm's CLIP target, -check passing; the archive is read without running it;
anything else stops with the file named and nothing written."""
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import paddle
import pytest
import torch
from timm.models.beit import Beit

import load_clip_weights
from clip_reference import TINY, VIT_B_16, openai_clip, random_images, save_state_dict, save_torchscript, unilm_target
from clip_teacher import build_clip_teacher
from helpers import ROOT, assert_output_untouched, assert_reads_as_paddle_load, existing_output, truncated, write_file
from load_clip_weights import STATE_DICT_COMMAND, main, read_torchscript_archive
from test_clip_teacher import TOLERANCE

# OpenAI's released file is TorchScript, which torch deprecates: the tests make and read such archives.
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.:FutureWarning')


def as_clip_loads_it(src) -> torch.nn.Module:
    """OpenAI's CLIP as clip.load(jit=False) builds it on CPU (build_model of the file's state dict, float32),
    holding the file's values (build_model rounds them to fp16, which a released file already is)."""
    if load_clip_weights.is_torchscript_archive(str(src)):
        state_dict = torch.jit.load(str(src)).state_dict()
    else:
        state_dict = torch.load(str(src))
    model = load_clip_weights.openai_clip_model().build_model(dict(state_dict)).float().eval()
    model.load_state_dict({name: value.float() for name, value in state_dict.items() if value.is_floating_point()})
    return model


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'load_clip_weights.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


SAVERS = {'torchscript archive (fp16, as released)': save_torchscript,
          'state dict (fp32, as clip.load(jit=False) gives it)': save_state_dict,
          'state dict in fp16': lambda model, path: save_state_dict(model, path, half=True)}


@pytest.mark.parametrize('fmt', sorted(SAVERS))
def test_openai_style_file_converts_with_check(tmp_path, capsys, fmt):
    src = SAVERS[fmt](openai_clip(TINY, seed=1), tmp_path / 'ViT-tiny.pt')
    dst = tmp_path / 'clip.pdparams'
    assert main(['-src', str(src), '-dst', str(dst), '-check']) == 0
    out = capsys.readouterr().out
    assert ('CLIP ViT image encoder: input_resolution=32, patch_size=8, width=128, layers=2, heads=2, '
            'output_dim=48') in out
    assert 'dropped the text encoder: 17 tensors (positional_embedding, text_projection, ...)' in out
    assert 'dropped the contrastive logit scale: 1 tensors (logit_scale)' in out
    assert ('dropped the TorchScript archive\'s settings: 3 tensors' in out) == fmt.startswith('torchscript')
    difference = float(re.search(r'max abs patch feature difference to OpenAI\'s CLIP: (\S+) ', out).group(1))
    assert difference <= TOLERANCE
    assert f'wrote 32 tensors to {dst}' in out
    assert_reads_as_paddle_load(dst)
    reference = as_clip_loads_it(src)
    visual_names = sorted(name for name in reference.state_dict() if name.startswith('visual.'))
    assert sorted(paddle.load(str(dst))) == visual_names
    images = random_images(4, 32, seed=3)
    features = build_clip_teacher(str(dst)).patch_features(paddle.to_tensor(images)).numpy()
    np.testing.assert_allclose(features, unilm_target(reference, images), rtol=0, atol=TOLERANCE)


def test_archive_reads_as_torchscript_loads_it(tmp_path):
    """The names, dtypes and values torch.jit.load's state_dict gives, without TorchScript."""
    src = save_torchscript(openai_clip(TINY, seed=2), tmp_path / 'ViT-tiny.pt')
    expected = torch.jit.load(str(src)).state_dict()
    tensors = read_torchscript_archive(str(src))
    assert sorted(tensors) == sorted(expected)
    assert {str(value.dtype) for value in tensors.values()} == {'float16', 'float32', 'int64'}
    for name, value in expected.items():
        assert tensors[name].dtype == value.numpy().dtype, name
        np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float64])
def test_archive_of_other_float_types_reads_as_float32_or_wider(tmp_path, dtype):
    """bfloat16 (which numpy lacks) widens to float32 exactly; other types keep theirs."""
    src = _traced_conv(tmp_path, dtype)
    expected = torch.jit.load(str(src)).state_dict()
    tensors = read_torchscript_archive(str(src))
    for name, value in expected.items():
        wanted = value.float().numpy() if dtype == torch.bfloat16 else value.numpy()
        assert tensors[name].dtype == wanted.dtype
        np.testing.assert_array_equal(tensors[name], wanted, err_msg=name)


@pytest.mark.slow
def test_vit_b16_archive_converts_to_unilms_target(tmp_path, capsys):
    """OpenAI's size (86M parameters in the image encoder) once, from the released file's format."""
    src = save_torchscript(openai_clip(VIT_B_16, seed=4), tmp_path / 'ViT-B-16.pt')
    dst = tmp_path / 'clip_vit_b16.pdparams'
    assert main(['-src', str(src), '-dst', str(dst)]) == 0  # -check is the tiny tests'; the comparison follows
    assert ('input_resolution=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512'
            in capsys.readouterr().out)
    teacher = build_clip_teacher(str(dst))
    assert teacher.feature_dim == 512
    images = random_images(2, 224, seed=5)
    features = teacher.patch_features(paddle.to_tensor(images)).numpy()
    assert features.shape == (2, 196, 512)
    np.testing.assert_allclose(features, unilm_target(as_clip_loads_it(src), images), rtol=0, atol=TOLERANCE)


def test_check_above_tolerance_writes_nothing(tmp_path, capsys, monkeypatch):
    real = load_clip_weights.openai_patch_features
    monkeypatch.setattr(load_clip_weights, 'openai_patch_features', lambda *args: real(*args) + 1e-3)
    src = save_state_dict(openai_clip(TINY), tmp_path / 'clip.pt')
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst), '-check']) == 2
    assert re.search(rf'error: outputs differ from OpenAI\'s CLIP by 0.001\d*; {dst} not written',
                     capsys.readouterr().err)
    assert_output_untouched(dst)


def test_check_without_the_clip_package_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    src = save_state_dict(openai_clip(TINY), tmp_path / 'clip.pt')
    monkeypatch.delitem(sys.modules, 'openai_clip_model')
    monkeypatch.setattr(load_clip_weights.importlib.util, 'find_spec', lambda name: None)
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst), '-check']) == 2
    assert capsys.readouterr().err == ('error: -check needs OpenAI\'s clip package: pip install --no-deps '
                                       'openai-clip==1.0.1\n')
    assert_output_untouched(dst)


class _RemovesOnLoad:
    """Pickles as a call of os.remove: what a malicious archive would hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def _archive(path, data_pkl: bytes, records: dict | None = None):
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/constants.pkl', pickle.dumps(()))
        for name, data in (records or {}).items():
            archive.writestr(f'archive/{name}', data)
    return path


def test_archive_pickling_code_is_refused_before_it_runs(tmp_path, capsys):
    sentinel = write_file(tmp_path / 'sentinel', b'still here')
    src = _archive(tmp_path / 'ViT-B-16.pt', pickle.dumps(_RemovesOnLoad(str(sentinel)), protocol=2))
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst)]) == 2
    assert capsys.readouterr().err == (
        f'error: {src}: a TorchScript archive whose data.pkl pickles {os.remove.__module__}.remove, which is not '
        f'read here (it could run code): save a plain state dict with OpenAI\'s clip package and convert that: '
        f'{STATE_DICT_COMMAND}\n')
    assert sentinel.read_bytes() == b'still here'
    assert_output_untouched(dst)


@pytest.mark.parametrize('size, stride, offset', [((5,), (1,), 0), ((2, 2), (2, 1), 1), ((2,), (-1,), 1),
                                                     ((2, 2), (1,), 0)])
def test_tensor_view_outside_its_storage_is_refused_not_read(size, stride, offset):
    """A crafted data.pkl could view memory past a storage: as_strided would read it."""
    with pytest.raises(pickle.UnpicklingError, match=re.escape(f'a tensor of size {size}, stride {stride} at '
                                                               f'offset {offset}')):
        load_clip_weights._rebuild_tensor(np.zeros(4, np.float32), offset, size, stride)
    np.testing.assert_array_equal(load_clip_weights._rebuild_tensor(np.arange(4.0), 1, (2, 2), (1, 1)),
                                  [[1, 2], [2, 3]])


def test_state_dict_command_is_the_one_the_message_names():
    assert STATE_DICT_COMMAND == ('python -c "import clip, torch; m,_=clip.load(\'ViT-B/16\', device=\'cpu\', '
                                  'jit=False); torch.save(m.state_dict(), \'clip_vit_b16.pt\')"')


def test_whole_pickled_clip_converts_with_trust_pickle(tmp_path, capsys):
    """torch.save(model) pickles OpenAI's classes: refused (see BAD_SOURCES) unless the user trusts the file."""
    reference = openai_clip(TINY, seed=6)
    src = _save(tmp_path / 'clip_model.pt', reference)
    dst = tmp_path / 'clip.pdparams'
    assert main(['-src', str(src), '-dst', str(dst), '-trust_pickle']) == 0
    assert f'wrote 32 tensors to {dst}' in capsys.readouterr().out
    images = random_images(2, 32, seed=7)
    features = build_clip_teacher(str(dst)).patch_features(paddle.to_tensor(images)).numpy()
    np.testing.assert_allclose(features, unilm_target(reference, images), rtol=0, atol=TOLERANCE)


def _tiny_state_dict():
    return openai_clip(TINY).state_dict()


def _save(path, obj):
    torch.save(obj, path)
    return path


def _archive_without_storage(tmp_path):
    """A well-formed archive whose data/ record of one tensor is cut short."""
    src = save_torchscript(openai_clip(TINY), tmp_path / 'ok.pt')
    with zipfile.ZipFile(src) as archive:
        records = {name.split('/', 1)[1]: archive.read(name) for name in archive.namelist()}
    records['data/0'] = records['data/0'][:-4]
    del records['constants.pkl']  # _archive writes its own
    return _archive(tmp_path / 'cut.pt', records.pop('data.pkl'), records)


def _traced_conv(tmp_path, dtype=torch.float32):
    """A TorchScript archive of another module, its weights in ``dtype``."""
    traced = torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8))
    with torch.no_grad():
        for param in traced.parameters():
            param.data = param.data.to(dtype)
    torch.jit.save(traced, str(tmp_path / 'conv.pt'))
    return tmp_path / 'conv.pt'


BAD_SOURCES = {
    'missing file': (lambda tmp: tmp / 'nope.pt', 'checkpoint not found: {src}'),
    'empty file': (lambda tmp: write_file(tmp / 'e.pt', b''), '{src}: not a readable PyTorch checkpoint'),
    'truncated archive': (lambda tmp: truncated(save_torchscript(openai_clip(TINY), tmp / 't.pt')),
                          '{src}: not a readable PyTorch checkpoint'),
    'archive with a cut tensor record': (_archive_without_storage,
                                         r'{src}: not a readable TorchScript archive \(UnpicklingError: storage 0 '
                                         r'holds \d+ elements, data.pkl says \d+\)'),
    'archive of another module': (_traced_conv, r'{src}: not a CLIP ViT of OpenAI\'s clip package \(no '
                                                r'visual.conv1.weight, .* among its 2 tensors, e.g. weight, bias\)'),
    'a BEiT classifier': (lambda tmp: _save(tmp / 'beit.pt', Beit(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                                  num_heads=4, num_classes=10).state_dict()),
                          r'{src}: not a CLIP ViT of OpenAI\'s clip package .* e.g. cls_token'),
    'a whole pickled CLIP': (lambda tmp: _save(tmp / 'm.pt', openai_clip(TINY)),
                             r'{src}: not a readable PyTorch checkpoint: it pickles openai_clip_model.CLIP, .*'
                             r'add -trust_pickle'),
    'a ResNet CLIP': (lambda tmp: _save(tmp / 'rn.pt', {**_tiny_state_dict(), 'visual.layer1.0.conv1.weight':
                                                        torch.ones(2, 2)}),
                      r'{src}: a ResNet CLIP \(visual.layer1.\*\): only CLIP\'s ViT image encoders convert'),
    'an unknown tensor': (lambda tmp: _save(tmp / 'u.pt', {**_tiny_state_dict(), 'lm_head.weight': torch.ones(2)}),
                          r"{src}: 1 tensors of no part of OpenAI's CLIP: \['lm_head.weight'\]"),
    'a missing tensor': (lambda tmp: _save(tmp / 'm.pt', {
        name: value for name, value in _tiny_state_dict().items()
        if name != 'visual.transformer.resblocks.1.ln_1.bias'}),
        r"{src}: not the tensors of this CLIP image encoder: 1 missing \['visual.transformer.resblocks.1.ln_1.bias'\]"),
    'a projection of another width': (lambda tmp: _save(tmp / 'w.pt', {
        **_tiny_state_dict(), 'visual.transformer.resblocks.0.mlp.c_fc.bias': torch.ones(7)}),
        r'{src}: visual.transformer.resblocks.0.mlp.c_fc.bias has shape \[7\], this CLIP image encoder needs \[512\]'),
}


@pytest.mark.parametrize('case', sorted(BAD_SOURCES))
def test_bad_source_fails_clearly_and_writes_nothing(tmp_path, capsys, case):
    make_source, message = BAD_SOURCES[case]
    src = make_source(tmp_path)
    dst = existing_output(tmp_path)
    assert main(['-src', str(src), '-dst', str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1
    assert re.search(message.format(src=re.escape(str(src))), err), err
    assert_output_untouched(dst)


@pytest.mark.slow
def test_cli_converts_and_refuses_in_one_line(tmp_path):
    src = save_torchscript(openai_clip(TINY), tmp_path / 'ViT-tiny.pt')
    dst = tmp_path / 'clip.pdparams'
    result = run_cli('-src', src, '-dst', dst, '-check')
    assert result.returncode == 0, result.stderr
    assert f'wrote 32 tensors to {dst}' in result.stdout
    foreign = _save(tmp_path / 'beit.pt', Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                               num_classes=10).state_dict())
    result = run_cli('-src', foreign, '-dst', tmp_path / 'out.pdparams')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        f'error: {foreign}: not a CLIP ViT of OpenAI\'s clip package (no visual.conv1.weight, visual.class_embedding, '
        'visual.positional_embedding, visual.proj, visual.transformer.resblocks.0.attn.in_proj_weight among its 34 '
        'tensors, e.g. cls_token, pos_embed, patch_embed.proj.weight)']
    assert not (tmp_path / 'out.pdparams').exists()
