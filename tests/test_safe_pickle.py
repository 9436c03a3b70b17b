"""safe_pickle.py: a weights file that would run code is refused by every entry point (exit 2, nothing written, the
code never runs) unless -trust_pickle is given; what paddle.save writes (Paddle 2.x and 3.x, protocols 2 to 4,
numpy 1.x and 2.x names) reads exactly as paddle.load reads it."""
import collections
import logging
import pickle
import pickletools
import random

import numpy as np
import paddle
import pytest

import export_model
import main_linprobe
import main_multi_gpu
import main_pretrain
import main_single_gpu
import predict
import safe_pickle
from beit import build_beit, relative_position_index
from config import ConfigError, get_config, merge_yaml
from helpers import TINY_CONFIG, assert_reads_as_paddle_load
from test_main_pretrain import PRETRAIN_CONFIG, demo_subset  # noqa: F401 (fixture: the embedded set's subset)
from tiny_data import write_dataset
from utils import LOGGER_NAME

FAST = ['DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '8', 'TRAIN.NUM_EPOCHS', '1']


class WritesMarker:
    """Unpickled, it calls exec, which writes ``marker``: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")',)


def malicious_weights(path, marker):
    """A plausible state dict of the tiny BEiT whose first entry runs code when unpickled."""
    tensors = {name: value.numpy() for name, value in build_beit(get_config(TINY_CONFIG)).state_dict().items()}
    with open(path, 'wb') as f:
        pickle.dump({'payload': WritesMarker(marker), **tensors}, f, protocol=4)
    return path


@pytest.fixture()
def evil(tmp_path):
    return malicious_weights(tmp_path / 'evil.pdparams', tmp_path / 'marker')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data'), num_train=16, num_val=5)


def test_a_file_that_would_run_code_is_refused_naming_file_and_global(evil):
    with pytest.raises(safe_pickle.UnsafePickleError) as refused:
        safe_pickle.load(str(evil))
    assert str(refused.value) == (f'{evil} pickles builtins.exec, which no weights file needs and which could run '
                                  'code when read: refused (if you trust the file, add -trust_pickle)')
    assert not (evil.parent / 'marker').exists()


def test_trust_pickle_reads_with_plain_pickle_and_says_so(evil, caplog, monkeypatch):
    """The file above really runs code under paddle.load: what the refusals below prevent."""
    monkeypatch.setattr(logging.getLogger(LOGGER_NAME), 'propagate', True)  # a run's logger does not propagate
    safe_pickle.load(str(evil), trust_pickle=True)
    assert (evil.parent / 'marker').read_text() == 'code ran'
    assert f'-trust_pickle: reading {evil} with plain pickle (paddle.load)' in caplog.text


def fine_tuning(data, output, *flags):
    return ['-cfg', TINY_CONFIG, '-data_path', str(data), '-output', str(output), *flags, '-opts', *FAST]


def pretraining(data, output, *flags, opts=()):
    """main_pretrain.py's and main_linprobe.py's arguments (-batch_size is the probe's LINPROBE.BATCH_SIZE)."""
    return ['-cfg', PRETRAIN_CONFIG, '-data_path', str(data), '-output', str(output), '-batch_size', '8', *flags,
            '-opts', 'DATA.NUM_WORKERS', '0', 'LINPROBE.NUM_EPOCHS', '1', *opts]


ENTRY_POINTS = {
    'main_single_gpu -pretrained': lambda d, p, out: main_single_gpu.main(fine_tuning(d['tiny'], out,
                                                                                      '-pretrained', p)),
    'main_single_gpu -eval': lambda d, p, out: main_single_gpu.main(fine_tuning(d['tiny'], out, '-eval',
                                                                                '-pretrained', p)),
    'main_single_gpu -resume': lambda d, p, out: main_single_gpu.main(fine_tuning(d['tiny'], out, '-resume', p)),
    'main_multi_gpu -ngpus 2 -pretrained': lambda d, p, out: main_multi_gpu.main(
        fine_tuning(d['tiny'], out, '-ngpus', '2', '-pretrained', p)),
    'main_pretrain -pretrained': lambda d, p, out: main_pretrain.main(pretraining(d['demo'], out, '-pretrained', p)),
    'main_pretrain -resume': lambda d, p, out: main_pretrain.main(pretraining(d['demo'], out, '-resume', p)),
    'main_pretrain tokenizer': lambda d, p, out: main_pretrain.main(pretraining(
        d['demo'], out, opts=['PRETRAIN.RANDOM_TOKENIZER', 'False', 'PRETRAIN.TOKENIZER_WEIGHTS', p])),
    'main_linprobe -pretrained': lambda d, p, out: main_linprobe.main(pretraining(d['demo'], out, '-pretrained', p)),
    'main_linprobe -resume': lambda d, p, out: main_linprobe.main(pretraining(d['demo'], out, '-resume', p)),
    'predict.py': lambda d, p, out: predict.main(['-cfg', TINY_CONFIG, '-pretrained', p, d['photo']]),
    'export_model.py': lambda d, p, out: export_model.main(['-cfg', TINY_CONFIG, '-pretrained', p, '-output',
                                                            str(out / 'exported')]),
}


@pytest.mark.parametrize('entry_point', [pytest.param(name, marks=pytest.mark.slow) if '-ngpus 2' in name else name
                                         for name in ENTRY_POINTS])  # -ngpus 2: spawned processes
def test_every_entry_point_refuses_it_with_exit_2_and_writes_nothing(entry_point, evil, data, demo_subset,  # noqa: F811
                                                                     photo_paths, tmp_path, capfd):
    output = tmp_path / 'out'
    inputs = {'tiny': data, 'demo': demo_subset, 'photo': str(photo_paths[0])}
    code = ENTRY_POINTS[entry_point](inputs, str(evil), output)
    assert code == 2
    assert not (tmp_path / 'marker').exists()
    assert not output.exists()
    assert f'{evil} pickles builtins.exec, which no weights file needs' in capfd.readouterr().err


def test_the_flag_opts_out_on_the_command_line(evil, photo_paths, tmp_path, capfd):
    """-trust_pickle reaches the reader: the code runs (and the payload is no tensor, so the weights still fail)."""
    predict.main(['-cfg', TINY_CONFIG, '-pretrained', str(evil), '-trust_pickle', str(photo_paths[0])])
    assert (tmp_path / 'marker').read_text() == 'code ran'
    capfd.readouterr()


def test_a_config_file_cannot_set_trust_pickle(tmp_path):
    config_file = tmp_path / 'trusting.yaml'
    config_file.write_text('TRUST_PICKLE: True\n')
    with pytest.raises(ConfigError, match=f'{config_file}: TRUST_PICKLE is set only on the command line'):
        merge_yaml(get_config(), str(config_file))
    config_file.write_text('TRUST_PICKLE: False\n')  # what a dumped config holds
    merge_yaml(get_config(), str(config_file))


def test_a_fine_tuning_run_writes_files_that_read_as_paddle_load_reads_them(data, tmp_path):
    """Epoch checkpoint (model, optimizer, scheduler, EMA) and best; pre-training, probe and converter outputs are
    checked where their tests write them."""
    output = tmp_path / 'run'
    assert main_single_gpu.main([*fine_tuning(data, output), 'TRAIN.MODEL_EMA', 'True']) == 0
    for name in ('checkpoint-epoch-1.pdparams', 'checkpoint-best.pdparams'):
        assert_reads_as_paddle_load(output / name)
    assert safe_pickle.load(str(output / 'checkpoint-best.pdparams'))['model_ema']


def paddlevit_state_dict() -> collections.OrderedDict:
    """The tiny BEiT's tensors as the older PaddleViT model saved them: the same parameter names, plus each block's
    relative_position_index buffer (int64, persistable there), as Paddle Tensors."""
    model = build_beit(get_config(TINY_CONFIG))
    state = model.state_dict()
    index = paddle.to_tensor(relative_position_index(model.patch_embed.grid))
    for block in range(len(model.blocks)):
        state[f'blocks.{block}.attn.relative_position_index'] = index
    return state


@pytest.mark.parametrize('protocol', [2, 3, 4])
def test_paddle_saves_of_each_protocol_read_the_same(protocol, tmp_path):
    """protocol 2 (Paddle 2.x's _legacy_save, fluid) pickles bytes through _codecs.encode and names __builtin__."""
    path = tmp_path / 'weights.pdparams'
    paddle.save({'model': paddlevit_state_dict(), 'epoch': 3, 'lr': np.float32(0.1), 'loss': 1.5, 'note': 'x',
                 'nothing': None, 'steps': [1, (2, 3)], 'half': paddle.ones([2]).astype('bfloat16')},
                str(path), protocol=protocol)
    assert_reads_as_paddle_load(path)


def test_an_older_checkpoint_with_rng_states_reads_the_same(tmp_path):
    """This project's checkpoints held the generators' states until a resume stopped using them."""
    path = tmp_path / 'checkpoint-epoch-1.pdparams'
    paddle.save({'model': paddlevit_state_dict(), 'rng_states': {
        'python': random.getstate(), 'numpy': np.random.get_state(), 'paddle': paddle.get_rng_state() * 2}}, str(path))
    assert_reads_as_paddle_load(path)


def test_a_paddlevit_state_dict_loads_into_the_model(tmp_path):
    path = tmp_path / 'beit_paddlevit.pdparams'
    saved = paddlevit_state_dict()
    paddle.save(saved, str(path))
    assert_reads_as_paddle_load(path)
    model = build_beit(get_config(TINY_CONFIG))
    model.set_state_dict(safe_pickle.load(str(path)))  # the index buffers are not the model's: ignored
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name].numpy(), err_msg=name)


def with_numpy1_names(data: bytes) -> bytes:
    """The same pickle as numpy 1.x writes it (numpy.core.* for numpy._core.*), frames dropped so that the
    renamed strings may change length."""
    out = bytearray()
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    for (op, arg, pos), end in zip(ops, ends):
        if op.name == 'FRAME':
            continue
        if op.name == 'SHORT_BINUNICODE' and arg.startswith('numpy._core'):
            renamed = arg.replace('numpy._core', 'numpy.core').encode()
            out += op.code.encode('latin1') + bytes([len(renamed)]) + renamed
        elif op.name == 'GLOBAL' and arg.startswith('numpy._core'):
            renamed = arg.replace('numpy._core', 'numpy.core').replace(' ', '\n')
            out += op.code.encode('latin1') + renamed.encode() + b'\n'
        else:
            out += data[pos:end]
    return bytes(out)


@pytest.mark.parametrize('protocol', [2, 4])
def test_numpy1_module_names_read_the_same(protocol, tmp_path):
    saved = tmp_path / 'numpy2.pdparams'
    paddle.save({'model': paddlevit_state_dict(), 'lr': np.float64(0.5)}, str(saved), protocol=protocol)
    old = tmp_path / 'numpy1.pdparams'
    old.write_bytes(with_numpy1_names(saved.read_bytes()))
    names = {arg for _, arg, _ in pickletools.genops(old.read_bytes()) if isinstance(arg, str)}
    assert any(name.startswith('numpy.core') for name in names)
    assert not any(name.startswith('numpy._core') for name in names)
    assert_reads_as_paddle_load(old)
    expected, actual = safe_pickle.load(str(saved)), safe_pickle.load(str(old))
    assert float(actual['lr']) == 0.5
    for name, value in expected['model'].items():
        np.testing.assert_array_equal(actual['model'][name].numpy(), value.numpy(), err_msg=name)


class DenseTensorAsPaddleSavesIt:
    """paddle.save's reducer of a DenseTensor: eval('data', {'data': array})."""

    def __reduce__(self):
        return eval, ('data', {'data': np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_a_dense_tensor_reads_without_eval(tmp_path):
    path = tmp_path / 'dense.pdparams'
    path.write_bytes(pickle.dumps({'w': DenseTensorAsPaddleSavesIt()}, protocol=4))
    assert_reads_as_paddle_load(path)
    np.testing.assert_array_equal(safe_pickle.load(str(path), return_numpy=True)['w'], np.arange(6).reshape(2, 3))


class EvalOfCode:
    def __reduce__(self):
        return eval, ('__import__("os").getcwd()', {})


REFUSED = {
    'eval of other code': (EvalOfCode(), 'builtins.eval is allowed only as paddle.save writes a DenseTensor'),
    'another codec': (type('Codec', (), {'__reduce__': lambda self: (__import__('_codecs').encode, ('x', 'rot13'))})(),
                      "_codecs.encode is allowed only with latin1, not 'rot13'"),
    'a class instance': (collections.Counter('ab'), 'pickles collections.Counter'),
    'a numpy function': (type('Np', (), {'__reduce__': lambda self: (np.load, ('x.npy',))})(),
                         'pickles numpy.load'),
}


@pytest.mark.parametrize('case', list(REFUSED))
def test_only_the_allowed_forms_of_each_global_are_read(case, tmp_path):
    payload, message = REFUSED[case]
    path = tmp_path / 'w.pdparams'
    path.write_bytes(pickle.dumps({'w': payload}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=message):
        safe_pickle.load(str(path))


def test_no_persistent_references(tmp_path):
    class WithPersistentIds(pickle.Pickler):
        def persistent_id(self, obj):
            return 'storage' if isinstance(obj, bytes) else None

    path = tmp_path / 'p.pdparams'
    with open(path, 'wb') as f:
        WithPersistentIds(f, protocol=4).dump({'w': b'data'})
    with pytest.raises(safe_pickle.UnsafePickleError, match="persistent reference \\('storage'\\)"):
        safe_pickle.load(str(path))
