"""The entry points: each main_*.py names its task and description and calls cli.launch, which runs the task in
this process or in one process per device (stand-ins for the processes and the GPUs here); -ngpus that is no
process count is refused; no module imports a script; no script exits for bad input with a bare 2."""
import ast
import importlib
import re

import paddle
import pytest

import cli
from errors import EXIT_BAD_INPUT
from helpers import ROOT, TINY_CONFIG
from task_finetune import FINE_TUNING

SHIMS = {'main_single_gpu': ('task_finetune', 'FINE_TUNING', True),
         'main_multi_gpu': ('task_finetune', 'FINE_TUNING', False),
         'main_pretrain': ('task_pretrain', 'PRETRAINING', False),
         'main_linprobe': ('task_linprobe', 'LINEAR_PROBING', False),
         'main_segment': ('task_segment', 'SEGMENTATION', False)}


@pytest.mark.parametrize('script', sorted(SHIMS))
def test_each_main_script_launches_its_task_through_cli(script, monkeypatch):
    task_module, task_name, one_process = SHIMS[script]
    module = importlib.import_module(script)
    calls = []
    monkeypatch.setattr(module, 'launch', lambda argv, **kwargs: calls.append((argv, kwargs)) or 7)
    assert module.main(['-cfg', 'x.yaml']) == 7
    [(argv, kwargs)] = calls
    assert argv == ['-cfg', 'x.yaml']
    assert kwargs['task'] is getattr(importlib.import_module(task_module), task_name)
    assert kwargs['description'] and kwargs.get('one_process', False) == one_process


@pytest.fixture
def stand_ins(monkeypatch):
    """cli's run, checks and spawn replaced by recorders; no GPU; not under paddle.distributed.launch."""
    calls = []
    monkeypatch.setattr(cli, 'run', lambda config, multi_process, task: calls.append(('run', multi_process)) or 0)
    monkeypatch.setattr(cli, 'check_inputs', lambda config, task: calls.append(('check',)) or 0)
    monkeypatch.setattr(cli, '_spawn_and_wait', lambda config, task, nprocs: calls.append(('spawn', nprocs)) or 0)
    monkeypatch.setattr(cli, 'die_with_parent', lambda: None)
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: False)
    monkeypatch.delenv('PADDLE_TRAINERS_NUM', raising=False)
    return calls


@pytest.mark.parametrize('one_process, launched, ngpus, expected', [
    (True, False, '2', [('run', False)]),  # main_single_gpu: one process whatever -ngpus says
    (False, True, '2', [('run', True)]),  # under paddle.distributed.launch: one of its processes, none spawned
    (False, False, '1', [('run', False)]),
    (False, False, None, [('run', False)]),  # a CPU without -ngpus: one process
    (False, False, '2', [('check',), ('spawn', 2)]),  # the inputs checked once, before any process starts
])
def test_launch_runs_in_process_or_spawns(stand_ins, monkeypatch, one_process, launched, ngpus, expected):
    if launched:
        monkeypatch.setenv('PADDLE_TRAINERS_NUM', '2')
    argv = ['-cfg', TINY_CONFIG, *(['-ngpus', ngpus] if ngpus else [])]
    assert cli.launch(argv, task=FINE_TUNING, description='test', one_process=one_process) == 0
    assert stand_ins == expected


@pytest.mark.parametrize('ngpus', ['0', '-2'])
@pytest.mark.parametrize('script', sorted(SHIMS))
def test_ngpus_that_is_no_process_count_is_refused(script, ngpus, stand_ins, capsys):
    assert importlib.import_module(script).main(['-cfg', TINY_CONFIG, '-ngpus', ngpus]) == EXIT_BAD_INPUT
    assert stand_ins == []  # nothing ran
    assert capsys.readouterr().err == (f'error: -ngpus: NGPUS must be a process count of at least 1, or -1 for one '
                                       f'process per visible GPU, got {ngpus}\n')


def test_process_count_follows_ngpus_else_the_visible_gpus(monkeypatch):
    config = cli.update_config(cli.get_config(), cli.build_arg_parser().parse_args(['-cfg', TINY_CONFIG]))
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: False)
    assert cli.process_count(config) == 1
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: True)
    monkeypatch.setattr(paddle.device.cuda, 'device_count', lambda: 4)
    assert cli.process_count(config) == 4
    config.defrost()
    config.NGPUS = 3
    assert cli.process_count(config) == 3


def test_more_gpus_than_visible_exits_2_before_any_process_starts(monkeypatch, capsys):
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: True)
    monkeypatch.setattr(paddle.device.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(cli, '_spawn_and_wait', lambda *args: pytest.fail('a process was started'))
    monkeypatch.delenv('PADDLE_TRAINERS_NUM', raising=False)
    assert cli.launch(['-cfg', TINY_CONFIG, '-ngpus', '3'], task=FINE_TUNING, description='test') == EXIT_BAD_INPUT
    assert '-ngpus 3: only 2 GPUs are visible (CUDA_VISIBLE_DEVICES)' in capsys.readouterr().err


def _is_main_guard(node) -> bool:
    """``if __name__ == '__main__':`` (either quotes, either order)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = [node.test.left, *node.test.comparators]
    return ({ast.unparse(side) for side in sides if isinstance(side, ast.Name)} == {'__name__'}
            and {side.value for side in sides if isinstance(side, ast.Constant)} == {'__main__'})


def _scripts() -> set:
    """The top-level files that run as scripts: those with a top-level ``if __name__ == '__main__':``."""
    return {path.stem for path in ROOT.glob('*.py')
            if any(map(_is_main_guard, ast.parse(path.read_text(encoding='utf-8')).body))}


def _imported_modules(path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_imports_a_script():
    """Scripts are command lines over modules: what two of them share lives in a module (cli.launch,
    torch_checkpoint, procs, cpu_runtime). Imports inside functions count too; the benchmarks are no exception."""
    scripts = _scripts()
    assert {'main_multi_gpu', 'load_pytorch_weights', 'predict', 'benchmark', 'benchmark_loss'} <= scripts
    assert not {'cli', 'torch_checkpoint', 'procs', 'cpu_runtime'} & scripts
    importing = {path.name: sorted(_imported_modules(path) & scripts) for path in ROOT.glob('*.py')}
    assert {name: found for name, found in importing.items() if found} == {}


def test_scripts_exit_for_bad_input_with_the_named_code():
    literal = re.compile(r'\breturn 2\b|exit\(2\)')
    found = [f'{path.name}:{number}' for path in ROOT.glob('*.py')
             for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1) if literal.search(line)]
    assert found == []
