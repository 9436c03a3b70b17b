"""The README's commands (run_demo.sh, run_tests.sh) and CI's (.ci/run) as they meet an installed Paddle and the
machine's GPUs, run against a stand-in `python` on PATH: it records every command, runs install_check.py with a
stand-in Paddle 3.3.1 (none, a CPU build, or a GPU build seeing N GPUs: the attributes install_check reads) and
runs nothing else (pip, training, pytest)."""
import json
import os
import stat
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # the shell scripts in subprocesses

STANDIN_PYTHON = f'''#!{sys.executable}
import json, os, runpy, shutil, sys
from types import SimpleNamespace
sys.path.insert(0, {str(ROOT)!r})
from install_check import requirement_lines

args = sys.argv[1:]
record = {{'python': os.path.abspath(__file__), 'args': args}}
if args[:2] == ['-m', 'pip']:
    record['requirements'] = [line for flag, path in zip(args, args[1:]) if flag == '-r'
                              for line in requirement_lines(path)]
with open(os.environ['STANDIN_LOG'], 'a') as log:
    log.write(json.dumps(record) + '\\n')
if args[:2] == ['-m', 'venv']:  # a new environment whose python is this stand-in too
    os.makedirs(os.path.join(args[2], 'bin'))
    shutil.copy(__file__, os.path.join(args[2], 'bin', 'python'))
elif args[:2] == ['-m', 'install_check']:
    paddle_build = os.environ['STANDIN_PADDLE']
    if paddle_build == 'none':
        sys.modules['paddle'] = None  # import paddle raises ImportError
    else:
        gpus = int(paddle_build.removeprefix('gpu:')) if paddle_build.startswith('gpu:') else 0
        cuda = SimpleNamespace(device_count=lambda: gpus)
        sys.modules['paddle'] = SimpleNamespace(__version__='3.3.1', device=SimpleNamespace(
            is_compiled_with_cuda=lambda: paddle_build != 'cpu', cuda=cuda))
    sys.argv = ['install_check.py', *args[2:]]
    runpy.run_module('install_check', run_name='__main__')
'''


def executable(path, text: str):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture()
def standin(tmp_path):
    """run(script, paddle, **env) -> (result, the commands it ran), with the stand-in python, python3, ruff and
    apt-get first on PATH."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    executable(bin_dir / 'python', STANDIN_PYTHON)
    executable(bin_dir / 'python3', STANDIN_PYTHON)
    for tool in ('ruff', 'apt-get'):
        executable(bin_dir / tool, '#!/bin/sh\nexit 0\n')
    log = tmp_path / 'commands.jsonl'

    def run(script: str, paddle: str, *args: str, **env: str):
        log.write_text('')
        environment = {key: value for key, value in os.environ.items() if key != 'NPROC'}
        environment.update(PATH=f'{bin_dir}:{os.environ["PATH"]}', STANDIN_LOG=str(log), STANDIN_PADDLE=paddle,
                           OUTPUT=str(tmp_path / 'demo'), **env)
        result = subprocess.run(['bash', str(ROOT / script), *args], capture_output=True, text=True,
                                env=environment, timeout=300)
        commands = [json.loads(line) for line in log.read_text().splitlines()]
        return result, commands
    return run


def pip_requirements(commands) -> list[str]:
    return [line for c in commands if c['args'][:2] == ['-m', 'pip'] for line in c.get('requirements', [])]


def asks_for_paddle(commands) -> bool:
    return any('paddlepaddle' in line for line in pip_requirements(commands)) or any(
        'paddlepaddle' in arg for c in commands if c['args'][:2] == ['-m', 'pip'] for arg in c['args'])


def demo_processes(commands) -> str:
    (train,) = [c['args'] for c in commands if c['args'][:1] == ['main_multi_gpu.py']]
    return train[train.index('-ngpus') + 1]


@pytest.mark.parametrize(('script', 'paddle'), [('run_demo.sh', 'cpu'), ('run_demo.sh', 'gpu:1'),
                                                 ('run_tests.sh', 'cpu')])  # tests next to a GPU build: below
def test_an_installed_paddle_is_never_replaced(standin, script, paddle):
    result, commands = standin(script, paddle)
    assert result.returncode == 0, result.stderr
    assert not asks_for_paddle(commands), commands
    assert {'numpy', 'pyyaml', 'pillow'} <= set(pip_requirements(commands)), commands  # the rest is installed


@pytest.mark.parametrize('script', ['run_demo.sh', 'run_tests.sh'])
def test_without_paddle_the_cpu_build_is_installed(standin, script):
    result, commands = standin(script, 'none')
    assert result.returncode == 0, result.stderr
    assert 'paddlepaddle==3.3.1' in pip_requirements(commands), commands


def test_the_tests_install_their_reference_and_what_dall_e_imports(standin):
    result, commands = standin('run_tests.sh', 'cpu', 'tests/test_cli.py')
    assert result.returncode == 0, result.stderr
    assert {'torch==2.14.1', 'timm==1.0.31', 'attrs', 'requests'} <= set(pip_requirements(commands)), commands
    assert commands[-1]['args'] == ['-m', 'pytest', '-q', 'tests/test_cli.py']


def test_next_to_a_gpu_paddle_the_tests_install_nothing_and_say_where_to_run(standin):
    result, commands = standin('run_tests.sh', 'gpu:1')
    assert result.returncode == 2
    assert 'GPU build of Paddle' in result.stderr and 'python3 -m venv .venv-tests' in result.stderr
    assert [c['args'][:2] for c in commands] == [['-m', 'install_check']], commands


@pytest.mark.parametrize(('paddle', 'nproc', 'processes'),
                         [('gpu:1', None, '1'), ('gpu:4', None, '4'), ('cpu', None, '2'), ('gpu:0', None, '2'),
                          ('gpu:4', '2', '2'), ('cpu', '1', '1')])
def test_the_demo_runs_one_process_per_gpu_or_two_on_a_cpu(standin, paddle, nproc, processes):
    result, commands = standin('run_demo.sh', paddle, **({'NPROC': nproc} if nproc else {}))
    assert result.returncode == 0, result.stderr
    assert demo_processes(commands) == processes
    assert commands[-1]['args'][0] == 'plot_metrics.py'


def test_ci_runs_the_readme_test_command_in_a_fresh_virtual_environment(standin):
    result, commands = standin('.ci/run', 'cpu', 'tests/test_cli.py')
    assert result.returncode == 0, result.stderr
    venv_created, *in_venv = commands
    assert venv_created['args'][:2] == ['-m', 'venv'] and venv_created['python'].endswith('/bin/python3')
    venv_python = os.path.join(venv_created['args'][2], 'bin', 'python')
    assert in_venv and all(c['python'] == venv_python for c in in_venv), commands
    assert in_venv[-1]['args'] == ['-m', 'pytest', '-q', 'tests/test_cli.py']
    assert not os.path.exists(venv_created['args'][2])  # removed afterwards
