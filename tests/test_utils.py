"""utils.py: crash-safe saving, append-only logs and metrics, seeds."""
import io
import json
import logging

import paddle
import pytest

import utils


def test_save_atomically_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'state.pdparams'
    utils.save_atomically({'w': paddle.ones([2])}, str(path))
    original = path.read_bytes()

    def crash(obj, target):
        with open(target, 'wb') as f:
            f.write(b'half a file')
        raise OSError('disk full')

    monkeypatch.setattr(utils.paddle, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        utils.save_atomically({'w': paddle.zeros([2])}, str(path))
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ['state.pdparams']


def test_save_atomically_replaces_and_creates_folders(tmp_path):
    path = tmp_path / 'new' / 'state.pdparams'
    utils.save_atomically({'epoch': 1}, str(path))
    utils.save_atomically({'epoch': 2}, str(path))
    assert paddle.load(str(path)) == {'epoch': 2}


def test_append_jsonl_keeps_earlier_records(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"split": "val", "epoch": 0}\n')
    utils.append_jsonl(str(path), {'split': 'train', 'epoch': 1, 'loss': 0.5})
    assert [json.loads(line)['epoch'] for line in path.read_text().splitlines()] == [0, 1]


def test_log_file_gets_setup_messages_and_is_appended_to(tmp_path, capsys):
    path = tmp_path / 'log.txt'
    path.write_text('earlier run\n')
    logger = utils.start_logger(is_main=True)
    logger.info('while setting up')
    assert path.read_text() == 'earlier run\n'  # nothing written before the inputs are accepted
    utils.attach_log_file(logger, str(path))
    logger.info('training')
    logger.error('failed')
    utils.close_logger(logger)
    lines = path.read_text().splitlines()
    assert lines[0] == 'earlier run' and [line.split(' ', 2)[2] for line in lines[1:]] == [
        'while setting up', 'training', 'failed']
    captured = capsys.readouterr()
    assert 'training' in captured.out and 'failed' not in captured.out and 'failed' in captured.err


def test_other_processes_log_warnings_only(capsys):
    logger = utils.start_logger(is_main=False)
    logger.info('quiet')
    logger.warning('loud')
    utils.close_logger(logger)
    captured = capsys.readouterr()
    assert 'quiet' not in captured.out + captured.err and 'loud' in captured.out
    assert logging.getLogger(utils.LOGGER_NAME).handlers == []


def test_derived_seeds_depend_on_every_part():
    assert utils.derived_seed(0, 1, 0) == utils.derived_seed(0, 1, 0)
    assert len({utils.derived_seed(0, 1, 0), utils.derived_seed(0, 2, 0), utils.derived_seed(0, 1, 1),
                utils.derived_seed(1, 1, 0)}) == 4


def test_cpu_threads_split_the_cores_between_local_processes(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setattr(utils.os, 'sched_getaffinity', lambda pid: set(range(8)))
    assert utils.use_all_cpu_cores(local_processes=2) == 4
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert utils.use_all_cpu_cores(local_processes=2) == 3
    monkeypatch.undo()
    utils.use_all_cpu_cores(local_processes=1)  # back to this machine's cores for the tests that follow


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(utils.sys, 'stderr', terminal)
    bar = utils.ProgressBar(4, 'epoch 1', enabled=True, width=8)
    bar.show(2)
    assert terminal.getvalue() == '\repoch 1 [####....] 2/4'
    bar.clear()
    assert terminal.getvalue().endswith('\r')
    monkeypatch.setattr(utils.sys, 'stderr', io.StringIO())
    silent = utils.ProgressBar(4, 'epoch 1', enabled=True)
    silent.show(1)
    assert utils.sys.stderr.getvalue() == ''
    assert not utils.ProgressBar(4, 'x', enabled=False).enabled
