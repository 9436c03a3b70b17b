"""gpu_runtime.py and its users (run_setup.py, job.py), with a stand-in compute capability (no GPU here): AMP the
GPU cannot do is refused, fused attention only where sdpa runs flash, the bias tables float32 under O2,
DETERMINISTIC's flags.

Each stands for a GPU behaviour read from Paddle 3.3.1's sources: auto_cast/decorate run float32 for float16
below capability 7.0 and bfloat16 below 8.0; sdpa's flash kernel needs half precision and capability 8.0 (else
its math path); decorate's excluded_layers keeps a listed type's own parameters in float32."""
import logging

import paddle
import pytest
from paddle.amp.auto_cast import amp_initialize

import cli
import gpu_runtime
import job
import main_single_gpu
import run_setup
from beit import Attention, build_beit
from config import ConfigError, get_config
from engine import Amp
from helpers import TINY_CONFIG
from task_finetune import FINE_TUNING
from tiny_data import write_dataset

CAPABILITIES = [(7, 0), (7, 5), (8, 0), (9, 0)]
PRECISIONS = ['float32', 'float16', 'bfloat16']


@pytest.fixture()
def on_gpu(monkeypatch):
    """Paddle reporting a GPU of the capability the test sets (default 8.0)."""
    capability = {'value': (8, 0)}
    monkeypatch.setattr(paddle, 'get_device', lambda: 'gpu:0')
    monkeypatch.setattr(paddle.device.cuda, 'get_device_capability', lambda *device: capability['value'])
    monkeypatch.setattr(paddle, 'is_compiled_with_rocm', lambda: False)
    return capability


def test_capability_is_the_gpus_and_none_off_a_gpu(on_gpu, monkeypatch):
    on_gpu['value'] = (7, 5)
    assert gpu_runtime.gpu_capability() == (7, 5)
    monkeypatch.setattr(paddle, 'get_device', lambda: 'cpu')
    assert gpu_runtime.gpu_capability() is None


@pytest.mark.parametrize('capability', [None, *CAPABILITIES])
@pytest.mark.parametrize('precision', PRECISIONS)
def test_fused_attention_only_where_flash_runs(precision, capability, monkeypatch):
    """MODEL.FUSED_ATTN gives sdpa to the attention layers only in half precision on capability 8.0 or newer;
    elsewhere sdpa would take its math path (197 tokens are no multiple of 8 for the memory-efficient kernel)."""
    expected = precision != 'float32' and capability is not None and capability >= (8, 0)
    assert gpu_runtime.fused_attention_runs(precision, capability) is expected
    monkeypatch.setattr(gpu_runtime, 'gpu_capability', lambda: capability)
    config = get_config(TINY_CONFIG)
    config.MODEL.FUSED_ATTN = True
    amp = Amp(True, 'O1', precision) if precision != 'float32' else Amp()
    model = run_setup.build_model(config, FINE_TUNING, amp)
    layers = [layer for layer in model.sublayers() if isinstance(layer, Attention)]
    assert len(layers) == config.MODEL.DEPTH and all(layer.fused is expected for layer in layers)
    assert ('scaled_dot_product_attention' in run_setup.fused_attention_note(config, model)) is expected


def test_fused_attention_off_by_config_stays_off(monkeypatch):
    monkeypatch.setattr(gpu_runtime, 'gpu_capability', lambda: (9, 0))
    model = run_setup.build_model(get_config(TINY_CONFIG), FINE_TUNING, Amp(True, 'O1', 'bfloat16'))
    assert not any(layer.fused for layer in model.sublayers() if isinstance(layer, Attention))


AMP_CASES = {  # (AMP_DTYPE, capability) -> what the log says, or the error
    ('float16', (6, 1)): 'AMP_DTYPE float16 needs a GPU of compute capability 7.0 or newer; this one is 6.1, where '
                         'Paddle would silently train in float32; run without -amp',
    ('bfloat16', (6, 1)): 'AMP_DTYPE bfloat16 needs a GPU of compute capability 8.0 or newer; this one is 6.1',
    ('bfloat16', (7, 0)): 'AMP_DTYPE bfloat16 needs a GPU of compute capability 8.0 or newer; this one is 7.0, where '
                          'Paddle would silently train in float32; use -opts AMP_DTYPE float16',
    ('bfloat16', (7, 5)): 'this one is 7.5',
    ('float16', (7, 0)): 'AMP O2 in float16 on compute capability 7.0',
    ('float16', (8, 0)): 'AMP O2 in float16 on compute capability 8.0',
    ('bfloat16', (8, 0)): 'AMP O2 in bfloat16 on compute capability 8.0',
    ('bfloat16', (9, 0)): 'AMP O2 in bfloat16 on compute capability 9.0',
}


@pytest.mark.parametrize('dtype, capability', list(AMP_CASES))
def test_amp_the_gpu_cannot_do_is_refused(dtype, capability, on_gpu, caplog):
    on_gpu['value'] = capability
    config = get_config(TINY_CONFIG)
    config.AMP, config.AMP_LEVEL, config.AMP_DTYPE = True, 'O2', dtype
    logger = logging.getLogger('test_gpu_runtime')
    supported = capability >= gpu_runtime.AMP_MIN_CAPABILITY[dtype]
    if not supported:
        with pytest.raises(ConfigError, match=AMP_CASES[dtype, capability]):
            run_setup.amp_for(config, logger)
        return
    with caplog.at_level(logging.INFO, logger='test_gpu_runtime'):
        amp = run_setup.amp_for(config, logger)
    assert amp == Amp(True, 'O2', dtype)
    assert caplog.messages == [AMP_CASES[dtype, capability]]


def test_amp_on_a_cpu_says_it_runs_float32(caplog):
    config = get_config(TINY_CONFIG)
    config.AMP, config.AMP_DTYPE = True, 'bfloat16'
    with caplog.at_level(logging.INFO, logger='test_gpu_runtime'):
        assert run_setup.amp_for(config, logging.getLogger('test_gpu_runtime')) == Amp()
    assert caplog.messages == ["AMP requested, but Paddle's AMP does nothing on CPU: running in float32"]


def test_a_refused_amp_ends_the_run_with_exit_2_and_nothing_written(on_gpu, tmp_path, capsys):
    on_gpu['value'] = (7, 5)
    data = write_dataset(tmp_path / 'data', num_train=8, num_val=4)
    output = tmp_path / 'out'
    code = main_single_gpu.main(['-cfg', TINY_CONFIG, '-data_path', str(data), '-output', str(output), '-amp',
                                 '-opts', 'AMP_DTYPE', 'bfloat16', 'DATA.NUM_WORKERS', '0'])
    assert code == cli.EXIT_BAD_INPUT
    message = 'AMP_DTYPE bfloat16 needs a GPU of compute capability 8.0 or newer; this one is 7.5'
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('shared', [False, True])
def test_o2_keeps_the_bias_tables_in_float32(dtype, shared, monkeypatch):
    """job's O2 decoration, with decorate doing on this CPU what it does on a GPU past its device check
    (amp_initialize with the excluded layers it was given): the bias tables stay float32, the Linear weights
    become half precision (a type in excluded_layers keeps only that layer's own parameters)."""
    passed = {}

    def decorate_as_on_a_gpu(models, optimizers=None, level='O1', dtype='float16', excluded_layers=None, **rest):
        passed.update(level=level, excluded_layers=excluded_layers, **rest)
        amp_initialize(models=[models], dtype=dtype, excluded_layers=excluded_layers)
        return models if optimizers is None else (models, optimizers)

    monkeypatch.setattr(paddle.amp, 'decorate', decorate_as_on_a_gpu)
    config = get_config(TINY_CONFIG)
    config.MODEL.USE_SHARED_REL_POS_BIAS, config.MODEL.USE_REL_POS_BIAS = shared, not shared
    model = run_setup.decorate_o2(build_beit(config), Amp(True, 'O2', dtype))
    assert passed['level'] == 'O2' and passed['save_dtype'] == 'float32'
    tables = {name: param.dtype for name, param in model.named_parameters() if 'relative_position_bias_table' in name}
    assert len(tables) == (1 if shared else config.MODEL.DEPTH)
    assert set(tables.values()) == {paddle.float32}
    half = getattr(paddle, dtype)
    for block in model.blocks:
        assert {block.attn.qkv.weight.dtype, block.attn.proj.weight.dtype, block.mlp.fc1.weight.dtype} == {half}
    assert model.head.weight.dtype == half


def test_deterministic_sets_the_flags_on_a_gpu_only_when_asked(on_gpu, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(paddle, 'set_flags', calls.append)
    logger = logging.getLogger('test_gpu_runtime')
    with caplog.at_level(logging.INFO, logger='test_gpu_runtime'):
        gpu_runtime.set_deterministic(False, logger)
        assert calls == [] and caplog.messages == []
        gpu_runtime.set_deterministic(True, logger)
        assert calls == [{'FLAGS_cudnn_deterministic': True}]
        assert caplog.messages[-1].startswith('DETERMINISTIC: set FLAGS_cudnn_deterministic')
        monkeypatch.setattr(paddle, 'get_device', lambda: 'cpu')
        gpu_runtime.set_deterministic(True, logger)
    assert calls == [{'FLAGS_cudnn_deterministic': True}]
    assert caplog.messages[-1] == 'DETERMINISTIC: nothing to set off a GPU (the CPU kernels are deterministic already)'


def test_deterministic_is_set_before_the_model_is_built(monkeypatch, tmp_path):
    events = []
    monkeypatch.setattr(gpu_runtime, 'set_deterministic', lambda enabled, logger: events.append(('flags', enabled)))
    real_build = job.build_model
    monkeypatch.setattr(job, 'build_model', lambda *a, **k: events.append(('model',)) or real_build(*a, **k))
    data = write_dataset(tmp_path / 'data', num_train=8, num_val=4)
    config = cli.parse_config(['-cfg', TINY_CONFIG, '-data_path', str(data), '-output', str(tmp_path / 'out'),
                               '-opts', 'DETERMINISTIC', 'True', 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '4'],
                              'test')
    job.prepare(config, job.World(), logging.getLogger('test_gpu_runtime'), FINE_TUNING)
    assert events == [('flags', True), ('model',)]
    assert get_config(TINY_CONFIG).DETERMINISTIC is False
