"""The entry scripts as users run them, in subprocesses on the tiny config: two processes through
paddle.distributed.launch and through main_multi_gpu.py's own spawn, exact evaluation across processes, a
SIGKILLed run resumed to the same weights as an uninterrupted one, the per-step LR in the log, bad input, the
modules a fine-tuning run imports."""
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest

from helpers import ENV, ROOT, TINY_CONFIG, kill_during, records
from procs import descendants
from tiny_data import write_dataset

pytestmark = pytest.mark.slow  # every test runs the scripts in subprocesses
NUM_VAL = 37  # divisible neither by 2 processes nor by the eval batch of 8
STEP_LINE = re.compile(r'epoch (\d+)/(\d+) step (\d+)/(\d+) lr (\S+) ')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data'), num_train=160, num_val=NUM_VAL)


def command(script, data, output, *flags, opts=()):
    return [sys.executable, str(ROOT / script), '-cfg', TINY_CONFIG, '-dataset', 'imagenet2012',
            '-data_path', str(data), '-output', str(output), *flags,
            '-opts', 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE_EVAL', '8', *opts]


def run(cmd, timeout=240, **env):
    result = subprocess.run(cmd, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f'{cmd}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}'
    return result


@pytest.fixture(scope='module')
def two_process_run(data, tmp_path_factory):
    """Three epochs on two processes started by paddle.distributed.launch (one CPU thread each)."""
    output = tmp_path_factory.mktemp('launch')
    script = command('main_multi_gpu.py', data, output / 'run', '-batch_size', '8',
                     opts=['TRAIN.NUM_EPOCHS', '3', 'REPORT_FREQ', '5'])
    run([sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
         str(output / 'launch_logs'), *script[1:]])
    return output / 'run'


def test_two_processes_train_with_falling_loss(two_process_run):
    train, val = records(two_process_run, 'train'), records(two_process_run, 'val')
    assert [r['epoch'] for r in train] == [1, 2, 3]
    assert all(r['num_samples'] == 160 for r in train)  # 10 steps x 8 images x 2 processes
    assert train[-1]['loss'] < train[0]['loss'] - 0.05
    assert val[-1]['loss'] < val[0]['loss'] - 0.1
    assert all(r['num_samples'] == NUM_VAL for r in val)
    log = (two_process_run / 'log.txt').read_text()
    assert '2 process(es)' in log and 'epoch 3/3 step 10/10' in log


def script_variables(data, **more):
    """run_*_multi.sh's variables for the tiny config on this CPU-only machine (-ngpus sets the process count)."""
    return dict(GPUS='', CONFIG=TINY_CONFIG, DATA_PATH=str(data), BATCH_SIZE='8', **more)


def test_evaluation_is_exact_whatever_the_number_of_processes(two_process_run, data, tmp_path):
    weights = two_process_run / 'checkpoint-epoch-3.pdparams'
    result = run(['sh', 'run_eval_multi.sh', '-ngpus', '2', '-output', str(tmp_path / 'two'),
                  '-opts', 'DATA.NUM_WORKERS', '0'], **script_variables(data, WEIGHTS=str(weights)))
    assert 'on 37 images' in result.stdout and 'AMP requested' in result.stdout
    run(command('main_single_gpu.py', data, tmp_path / 'one', '-eval', '-pretrained', str(weights)))
    (two,), (one,) = records(tmp_path / 'two', 'val'), records(tmp_path / 'one', 'val')
    assert two['num_samples'] == one['num_samples'] == NUM_VAL
    assert (two['acc1'], two['acc5']) == (one['acc1'], one['acc5'])
    assert two['loss'] == pytest.approx(one['loss'], rel=1e-5)
    assert two['epoch'] == 3
    # the training run's own last evaluation, on two processes, saw the same weights
    assert records(two_process_run, 'val')[-1]['acc1'] == one['acc1']


def test_train_script_runs_as_written(data, tmp_path):
    output = tmp_path / 'script'
    run(['sh', 'run_train_multi.sh', '-ngpus', '2', '-output', str(output),
         '-opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.NUM_EPOCHS', '1'], **script_variables(data))
    assert (output / 'checkpoint-epoch-1.pdparams').exists()
    (train,) = records(output, 'train')
    assert train['num_samples'] == 160 and '2 process(es)' in (output / 'log.txt').read_text()


RESUME_OPTS = ['TRAIN.NUM_EPOCHS', '3', 'REPORT_FREQ', '1', 'TRAIN.MODEL_EMA', 'True', 'TRAIN.LINEAR_SCALED_LR', '16',
               'TRAIN.WARMUP_START_LR', '1e-5', 'TRAIN.END_LR', '2e-5']


def resumable_command(data, output, *flags):
    return command('main_single_gpu.py', data, output, '-batch_size', '4', '-accum_iter', '2', *flags,
                   opts=RESUME_OPTS)


@pytest.fixture(scope='module')
def resumed_runs(data, tmp_path_factory):
    """An uninterrupted run, and one SIGKILLed in the middle of epoch 2 then resumed from its checkpoint."""
    root = tmp_path_factory.mktemp('resume')
    run(resumable_command(data, root / 'full'))
    killed = root / 'killed'
    kill_during(resumable_command(data, killed), killed / 'log.txt', 'epoch 2/3 step 6/20')
    assert sorted(p.name for p in killed.glob('checkpoint-epoch-*')) == ['checkpoint-epoch-1.pdparams']
    run(resumable_command(data, killed, '-resume', str(killed / 'checkpoint-epoch-1.pdparams')))
    return root / 'full', killed


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(resumed_runs):
    full, killed = (paddle.load(str(folder / 'checkpoint-epoch-3.pdparams')) for folder in resumed_runs)
    for part in ('model', 'model_ema'):
        for name, value in full[part].items():
            np.testing.assert_allclose(killed[part][name].numpy(), value.numpy(), rtol=0, atol=1e-6,
                                       err_msg=f'{part} {name}')
    for name, value in full['optimizer'].items():
        if isinstance(value, paddle.Tensor):
            np.testing.assert_allclose(killed['optimizer'][name].numpy(), value.numpy(), rtol=0, atol=1e-6)
    assert killed['global_step'] == full['global_step'] == 60
    full_val, killed_val = (records(folder, 'val')[-1] for folder in resumed_runs)
    assert killed_val['epoch'] == full_val['epoch'] == 3
    assert (killed_val['acc1'], killed_val['ema_acc1']) == (full_val['acc1'], full_val['ema_acc1'])
    assert killed_val['loss'] == pytest.approx(full_val['loss'], abs=1e-6)


def closed_form_lr(step):
    """The schedule of RESUME_OPTS written out: LRs scaled by total batch 4 x 2 / 16, 20 steps per epoch, one
    warm-up epoch of 20 steps, cosine over the other 40."""
    scale = 4 * 1 * 2 / 16
    peak, start, end = 1e-3 * scale, 1e-5 * scale, 2e-5 * scale
    if step < 20:
        return start + (peak - start) * step / 20
    return end + (peak - end) * (1 + math.cos(math.pi * (step - 20) / 40)) / 2


def logged_lrs(log):
    """{global step: lr} of every step line (an interrupted and resumed run logs some steps twice)."""
    lrs = {}
    for epoch, _, step, steps, lr in STEP_LINE.findall(log.read_text()):
        lrs.setdefault((int(epoch) - 1) * int(steps) + int(step) - 1, []).append(float(lr))
    return lrs


def test_logged_lr_follows_the_closed_form_with_accumulation_and_resume(resumed_runs):
    for folder in resumed_runs:
        lrs = logged_lrs(folder / 'log.txt')
        assert sorted(lrs) == list(range(60))
        for step, values in lrs.items():
            for value in values:
                assert value == pytest.approx(closed_form_lr(step), rel=1e-6), (folder.name, step)


def test_bad_input_exits_with_an_error_before_starting_processes(data, tmp_path):
    for script in ('main_single_gpu.py', 'main_multi_gpu.py'):
        result = subprocess.run(command(script, tmp_path / 'no_such_folder', tmp_path / 'out', '-ngpus', '2'),
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert 'DATA.DATA_PATH not found' in result.stderr
        assert not (tmp_path / 'out').exists()


def checkpoint_saved_on_two_gpus(source, folder):
    """``source`` with the RNG states that a run on two GPUs saved before this project stopped saving them:
    paddle.get_rng_state() gives one state per visible GPU there."""
    checkpoint = paddle.load(str(source))
    checkpoint['rng_states'] = {'python': random.getstate(), 'numpy': np.random.get_state(),
                                'paddle': paddle.get_rng_state() * 2}
    folder.mkdir()
    paddle.save(checkpoint, str(folder / source.name))
    return folder / source.name


@pytest.mark.parametrize('processes', ['1', '2'])
def test_a_checkpoint_from_two_gpus_resumes_on_any_device(processes, two_process_run, data, tmp_path):
    checkpoint = checkpoint_saved_on_two_gpus(two_process_run / 'checkpoint-epoch-3.pdparams', tmp_path / 'gpus')
    output = tmp_path / 'resumed'
    result = run(command('main_multi_gpu.py', data, output, '-ngpus', processes, '-batch_size', '8',
                         '-resume', str(checkpoint), opts=['TRAIN.NUM_EPOCHS', '4']))
    assert 'Traceback' not in result.stderr
    assert [r['epoch'] for r in records(output, 'train')] == [4]
    assert (output / 'checkpoint-epoch-4.pdparams').exists()


OPEN_COUNTER = '''
import os
import sys

_WATCHED = set(os.environ['BEIT_TEST_WATCHED'].split(os.pathsep))


def _count_opens(event, args):
    if event == 'open' and isinstance(args[0], str) and os.path.realpath(args[0]) in _WATCHED:
        with open(os.environ['BEIT_TEST_OPENS'], 'a') as f:
            f.write(f'{os.getpid()} {os.path.basename(args[0])}\\n')


sys.addaudithook(_count_opens)
'''


def run_with_audit_hook(cmd, tmp_path, hook_source: str, **env):
    """Run ``cmd`` with an audit hook that sitecustomize installs in every Python process started with the test's
    PYTHONPATH (spawned processes and loader workers included)."""
    hook = tmp_path / 'hook'
    hook.mkdir(exist_ok=True)
    (hook / 'sitecustomize.py').write_text(hook_source)
    return run(cmd, PYTHONPATH=str(hook), **env)


def list_reads(cmd, data, tmp_path):
    """{list file name: how many times any process of ``cmd`` opened it}."""
    counts = tmp_path / 'opens.txt'
    watched = os.pathsep.join(os.path.realpath(data / f'{split}_list.txt') for split in ('train', 'val'))
    run_with_audit_hook(cmd, tmp_path, OPEN_COUNTER, BEIT_TEST_WATCHED=watched, BEIT_TEST_OPENS=str(counts))
    names = [line.split()[1] for line in counts.read_text().splitlines()]
    return {name: names.count(name) for name in sorted(set(names))}


@pytest.mark.parametrize('starter', ['spawn', 'launch'])
def test_the_lists_are_read_and_checked_once_per_run(starter, data, tmp_path):
    script = command('main_multi_gpu.py', data, tmp_path / 'run', '-ngpus', '2', '-batch_size', '8',
                     opts=['TRAIN.NUM_EPOCHS', '1'])
    if starter == 'launch':
        script = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', '2', '--log_dir',
                  str(tmp_path / 'launch_logs'), *script[1:]]
    assert list_reads(script, data, tmp_path) == {'train_list.txt': 1, 'val_list.txt': 1}
    assert [record['epoch'] for record in records(tmp_path / 'run', 'val')] == [1]


IMPORT_RECORDER = '''
import os
import sys

_WATCHED = set(os.environ['BEIT_TEST_WATCHED_MODULES'].split(','))


def _record_imports(event, args):
    if event == 'import' and args[0] in _WATCHED:
        with open(os.environ['BEIT_TEST_IMPORTS'], 'a') as f:
            f.write(f'{os.getpid()} {args[0]}\\n')


sys.addaudithook(_record_imports)
'''
# The tokenizer, the converters and what only they need: a fine-tuning run has no use for any of them.
NOT_FOR_FINE_TUNING = ('dalle_tokenizer', 'dall_e', 'load_pytorch_weights', 'load_dalle_weights', 'torch_checkpoint',
                       'beit_pretrain', 'task_pretrain', 'torch', 'timm')


def test_fine_tuning_evaluation_and_resume_import_no_tokenizer_or_converter(data, tmp_path):
    imports = tmp_path / 'imports.txt'
    env = {'BEIT_TEST_WATCHED_MODULES': ','.join((*NOT_FOR_FINE_TUNING, 'task_finetune')),
           'BEIT_TEST_IMPORTS': str(imports)}
    output = tmp_path / 'run'
    train = command('main_multi_gpu.py', data, output, '-ngpus', '2', '-batch_size', '8',
                    opts=['TRAIN.NUM_EPOCHS', '1'])
    run_with_audit_hook(train, tmp_path, IMPORT_RECORDER, **env)
    resume = command('main_single_gpu.py', data, output, '-batch_size', '8', '-resume', str(output),
                     opts=['TRAIN.NUM_EPOCHS', '2'])
    run_with_audit_hook(resume, tmp_path, IMPORT_RECORDER, **env)
    evaluate = command('main_single_gpu.py', data, tmp_path / 'eval', '-eval', '-pretrained',
                       str(output / 'checkpoint-epoch-2.pdparams'))
    run_with_audit_hook(evaluate, tmp_path, IMPORT_RECORDER, **env)
    recorded = [line.split() for line in imports.read_text().splitlines()]
    assert len({pid for pid, name in recorded if name == 'task_finetune'}) >= 4  # the hook saw every run's processes
    assert sorted({name for _, name in recorded} - {'task_finetune'}) == []


DEMO_CONFIG = str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml')


def demo_command(output, *opts):
    return [sys.executable, str(ROOT / 'main_single_gpu.py'), '-cfg', DEMO_CONFIG, '-output', str(output),
            '-opts', 'TRAIN.NUM_EPOCHS', '2', 'SAVE_FREQ', '1', *opts]


def test_the_number_of_loader_workers_does_not_change_the_run(tmp_path):
    """Every sample's augmentation draws depend on (SEED, epoch, rank, sample index), not on the worker."""
    for workers in ('0', '2'):
        run(demo_command(tmp_path / workers, 'DATA.NUM_WORKERS', workers), timeout=600)
    zero, two = (paddle.load(str(tmp_path / workers / 'checkpoint-epoch-2.pdparams')) for workers in ('0', '2'))
    for part in ('model', 'model_ema'):
        for name, value in zero[part].items():
            np.testing.assert_array_equal(two[part][name].numpy(), value.numpy(), err_msg=f'{part} {name}')


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_line(process, log, line, timeout=120):
    deadline = time.time() + timeout
    while not (log.exists() and line in log.read_text()):
        assert process.poll() is None, 'the run ended before the line'
        assert time.time() < deadline, f'no "{line}" in {log}'
        time.sleep(0.05)


def alive(pid):
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return state != 'Z'


def test_a_second_run_in_a_live_runs_folder_is_refused(data, tmp_path):
    output = tmp_path / 'run'
    first = start(command('main_single_gpu.py', data, output, opts=['TRAIN.NUM_EPOCHS', '50']))
    try:
        wait_for_line(first, output / 'log.txt', 'checkpoint-epoch-1.pdparams')  # saved: the -eval below uses it
        for cmd in (command('main_single_gpu.py', data, output, opts=['TRAIN.NUM_EPOCHS', '50']),
                    command('main_multi_gpu.py', data, output, '-ngpus', '2', '-resume', str(output))):
            second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f'{output} is in use by a live run (pid {first.pid} on ' in second.stderr
    finally:
        first.kill()
        first.wait()
    weights = output / 'checkpoint-epoch-1.pdparams'
    result = run(command('main_single_gpu.py', data, output, '-eval', '-pretrained', str(weights)))  # dead: no block
    assert 'on 37 images' in result.stdout


def processes_once_running(launcher, count, timeout=60):
    """The launcher's descendants once there are ``count`` of them (each process starts its workers in turn)."""
    deadline = time.time() + timeout
    while len(processes := descendants(launcher.pid)) < count:
        assert launcher.poll() is None and time.time() < deadline, f'only {len(processes)} processes: {processes}'
        time.sleep(0.05)
    return processes


LAUNCHERS = {  # name -> (script, its flags, command prefix, processes below the killed one at least)
    'one process': ('main_single_gpu.py', (), (), 2),
    'spawn': ('main_multi_gpu.py', ('-ngpus', '2'), (), 6),
    'launch': ('main_multi_gpu.py', (), ('-m', 'paddle.distributed.launch', '--nproc_per_node', '2'), 6),
}


@pytest.mark.parametrize('launcher_name', LAUNCHERS)
def test_killing_the_launcher_ends_every_process_of_the_run(launcher_name, data, tmp_path):
    script, flags, prefix, at_least = LAUNCHERS[launcher_name]
    output = tmp_path / 'run'
    cmd = command(script, data, output, *flags, opts=['TRAIN.NUM_EPOCHS', '50', 'DATA.NUM_WORKERS', '2',
                                                      'REPORT_FREQ', '1'])
    if prefix:
        cmd = [cmd[0], *prefix, '--log_dir', str(tmp_path / 'launch_logs'), *cmd[1:]]
    launcher = start(cmd)
    try:
        wait_for_line(launcher, output / 'log.txt', 'epoch 2/50 step 2/')  # mid-epoch: the loader workers run
        processes = processes_once_running(launcher, at_least)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.time() + 10
    while any(map(alive, processes)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if alive(pid)]


BEST_LINE = re.compile(r'best val acc1 so far (\S+) \(epoch (\d+), (\w+) weights\)')


def test_a_resumed_run_records_each_epoch_once_and_the_best_of_the_whole_run(data, tmp_path):
    output = tmp_path / 'run'
    cmd = [*resumable_command(data, output), 'SAVE_FREQ', '2', 'TRAIN.NUM_EPOCHS', '4']
    kill_during(cmd, output / 'log.txt', 'epoch 4/4 step 3/20')  # epochs 1-3 recorded, the checkpoint of 2
    assert [record['epoch'] for record in records(output, 'val')] == [1, 2, 3]
    run([*cmd[:2], '-resume', str(output), *cmd[2:]])
    for split in ('train', 'val'):
        assert [record['epoch'] for record in records(output, split)] == [1, 2, 3, 4]
    superseded = [json.loads(line) for line in (output / 'metrics-superseded.jsonl').read_text().splitlines()]
    assert sorted((record['split'], record['epoch']) for record in superseded) == [('train', 3), ('val', 3)]
    best_ema = max(records(output, 'val'), key=lambda record: record['ema_acc1'])
    acc1, epoch, weights = BEST_LINE.findall((output / 'log.txt').read_text())[-1]
    assert (float(acc1), int(epoch), weights) == (round(best_ema['ema_acc1'], 4), best_ema['epoch'], 'EMA')
    assert paddle.load(str(output / 'checkpoint-best.pdparams'))['best']['acc1'] == best_ema['ema_acc1']
