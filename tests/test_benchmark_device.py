"""benchmark.py on a GPU, through stand-ins (no GPU here): every path and timm run on the device Paddle sees, the
peaks come from each framework's device allocator, and O2 evaluation runs a decorated model as a run does."""
import argparse

import paddle
import pytest
import torch

import benchmark
from config import get_config
from helpers import ROOT

MIB = 2 ** 20
TINY = str(ROOT / 'configs' / 'beit_tiny_patch4_32.yaml')


def stand_in_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: True)
    monkeypatch.setattr(paddle.device.cuda, 'device_count', lambda: count)


def stand_in_allocator(monkeypatch, module, reset: str, calls: list) -> None:
    """An allocator holding 1 MiB, whose peak is 5 MiB once reset (0 before: a reset that never came shows)."""
    monkeypatch.setattr(module, reset, lambda: calls.append(reset))
    monkeypatch.setattr(module, 'memory_allocated', lambda: 1 * MIB)
    monkeypatch.setattr(module, 'max_memory_allocated', lambda: 5 * MIB if reset in calls else 0)


def arguments(device: str, child: str = 'dygraph') -> argparse.Namespace:
    """A child's arguments as benchmark.py's parser makes them (every flag it has, at its default)."""
    return benchmark.build_parser().parse_args(['-cfg', str(TINY), '-batch_size', '2', '-warmup', '1', '-steps', '1',
                                                '-device', device, '-child', child])


@pytest.mark.parametrize(('gpus', 'device'), [(1, 'gpu'), (4, 'gpu'), (0, 'cpu')])
def test_every_child_is_told_the_device_paddle_sees(monkeypatch, gpus, device):
    stand_in_gpus(monkeypatch, gpus)
    assert benchmark.benchmark_device() == device
    args = arguments(benchmark.benchmark_device())
    for backend in ('dygraph', 'amp_o2', 'timm', 'timm_bf16'):
        command = benchmark.child_command(args, backend)
        assert command[command.index('-device') + 1] == device


def test_a_cpu_build_runs_everything_on_the_cpu(monkeypatch):
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: False)
    assert benchmark.benchmark_device() == 'cpu'


def test_gpu_paths_are_offered_on_a_gpu_and_cpu_only_ones_on_a_cpu():
    on_gpu, on_cpu = (benchmark.available_backends('eval', device, 'classification') for device in ('gpu', 'cpu'))
    assert {'amp_o1', 'amp_o2', 'dygraph', 'timm'} <= set(on_gpu) and not {'inference', 'inference_bf16'} & set(on_gpu)
    assert {'inference', 'dygraph', 'timm'} <= set(on_cpu) and not {'amp_o1', 'amp_o2'} & set(on_cpu)


def test_timm_runs_on_the_gpu_or_not_at_all(monkeypatch):
    assert benchmark.torch_device('cpu') == 'cpu'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert benchmark.torch_device('gpu') == 'cuda'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='torch sees no GPU'):
        benchmark.torch_device('gpu')


@pytest.mark.parametrize(('framework', 'module', 'reset'),
                         [('paddle', paddle.device.cuda, 'reset_max_memory_allocated'),
                          ('torch', torch.cuda, 'reset_peak_memory_stats')])
def test_gpu_peaks_come_from_the_frameworks_device_allocator(monkeypatch, framework, module, reset):
    calls = []
    stand_in_allocator(monkeypatch, module, reset, calls)
    start, peak = benchmark.memory_meter(framework, 'gpu')
    assert start() == 1.0 and calls == [reset]
    assert peak() == 5.0


def test_cpu_peaks_stay_the_process_rss():
    assert benchmark.memory_meter('paddle', 'cpu') == (benchmark.start_peak_memory, benchmark.peak_memory_mb)
    assert benchmark.memory_meter('torch', 'cpu') == (benchmark.start_peak_memory, benchmark.peak_memory_mb)


def test_a_gpu_measurement_puts_paddle_on_the_gpu_and_reads_its_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(paddle, 'set_device', calls.append)  # the model then runs on the CPU here
    stand_in_allocator(monkeypatch, paddle.device.cuda, 'reset_max_memory_allocated', calls)
    result = benchmark.measure(arguments('gpu'))
    assert calls == ['gpu', 'reset_max_memory_allocated']  # the meter reads the device the model is put on
    assert result['peak_mb'] == 4.0 and result['images_per_sec'] > 0


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_o2_decorates_the_model_in_amp_dtype_for_evaluation_too(monkeypatch, mode):
    config = get_config(TINY)
    config.defrost()
    config.AMP_DTYPE = 'bfloat16'
    decorated = []
    real_decorate = paddle.amp.decorate

    def decorate(**kwargs):
        decorated.append({key: value for key, value in kwargs.items() if key in ('level', 'dtype')}
                         | {'optimizer': kwargs.get('optimizers') is not None})
        return real_decorate(**kwargs)  # on a CPU: Paddle leaves the model as it is
    monkeypatch.setattr(paddle.amp, 'decorate', decorate)
    step = benchmark.paddle_step(config, 'amp_o2', mode, 2)
    step()
    assert decorated == [{'level': 'O2', 'dtype': 'bfloat16', 'optimizer': mode == 'train'}]
