"""run_folder.py without a model: the lock of a live run, what start-up cleans, the folder rules (resume, rewind,
refusal, records set aside), saving, pruning and the best record, with stand-in checkpoints."""
import json
import os
import shutil

import paddle
import pytest

import run_folder
from utils import start_logger


def test_a_held_lock_names_its_process_and_a_released_one_blocks_nothing(tmp_path):
    handle = run_folder.lock(str(tmp_path))
    with pytest.raises(run_folder.RunFolderBusyError, match=r'is in use by a live run \(pid \d+ on '):
        run_folder.check_free(str(tmp_path))
    with pytest.raises(run_folder.RunFolderBusyError):
        run_folder.lock(str(tmp_path))
    handle.close()  # what the kernel does when the process dies
    run_folder.check_free(str(tmp_path))
    run_folder.lock(str(tmp_path)).close()


def test_start_up_removes_only_this_projects_temporary_files(tmp_path):
    names = ['checkpoint-epoch-3.pdparams.tmp4242', 'checkpoint-best.pdparams.tmp7', 'metrics.jsonl.tmp12',
             'checkpoint-epoch-3.pdparams', 'notes.txt.tmp5', 'checkpoint-epoch-3.pdparams.tmpx', 'mine.tmp9']
    for name in names:
        (tmp_path / name).write_text('x')
    removed = run_folder.remove_stale_temp_files(str(tmp_path))
    assert removed == ['checkpoint-best.pdparams.tmp7', 'checkpoint-epoch-3.pdparams.tmp4242', 'metrics.jsonl.tmp12']
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - set(removed))


def test_superseded_lines_move_aside_in_order(tmp_path):
    lines = [{'split': 'train', 'epoch': 1}, {'split': 'val', 'epoch': 1}, {'split': 'train', 'epoch': 2},
             {'split': 'val', 'epoch': 2, 'acc1': 0.5}, {'split': 'train', 'epoch': 3}]
    (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(line) + '\n' for line in lines) + 'not json\n')
    (tmp_path / 'metrics-superseded.jsonl').write_text('{"split": "train", "epoch": 9}\n')
    assert run_folder.supersede_records_after(str(tmp_path), 1) == 3
    kept = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line) for line in kept[:2]] == lines[:2] and kept[2] == 'not json'
    aside = [json.loads(line) for line in (tmp_path / 'metrics-superseded.jsonl').read_text().splitlines()]
    assert aside == [{'split': 'train', 'epoch': 9}, *lines[2:]]
    assert run_folder.supersede_records_after(str(tmp_path), 1) == 0


def test_resume_path_of_a_folder_is_its_latest_checkpoint(tmp_path):
    for epoch in (2, 10, 9):
        (tmp_path / f'checkpoint-epoch-{epoch}.pdparams').write_bytes(b'x')
    assert run_folder.resolve_resume_path(str(tmp_path)).endswith('checkpoint-epoch-10.pdparams')
    with pytest.raises(run_folder.RunFolderError, match='not found'):
        run_folder.resolve_resume_path(str(tmp_path / 'missing.pdparams'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(run_folder.RunFolderError, match='holds no checkpoint'):
        run_folder.resolve_resume_path(str(tmp_path / 'empty'))


def save_epoch_file(path, epoch):
    """A stand-in checkpoint: what the run folder reads of one is its epoch."""
    paddle.save({'epoch': epoch}, str(path))
    return path


def later_mtime(path, seconds=10):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_a_folder_with_only_a_best_file_resumes_from_it(tmp_path):
    best = save_epoch_file(tmp_path / 'checkpoint-best.pdparams', 2)
    assert run_folder.resolve_resume_path(str(tmp_path)) == str(best)


def test_output_naming_a_file_is_refused(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('mine')
    with pytest.raises(run_folder.RunFolderError, match=f'-output {path} is a file'):
        run_folder.RunFolder(str(path)).check()
    with pytest.raises(run_folder.RunFolderError, match='is a file'):
        run_folder.RunFolder(str(path), training=False).check()
    assert path.read_text() == 'mine'


@pytest.mark.parametrize('saved, held', [
    (['checkpoint-epoch-10.pdparams'], 'checkpoint-epoch-10.pdparams'),  # a pre-training run: no best file
    (['checkpoint-best.pdparams'], 'that run died before its first epoch checkpoint'),
])
def test_a_new_run_never_writes_where_another_saved_checkpoints(saved, held, tmp_path):
    for name in saved:
        (tmp_path / name).write_bytes(b'x')
    with pytest.raises(run_folder.RunFolderError) as raised:
        run_folder.RunFolder(str(tmp_path)).check()
    assert held in str(raised.value) and f'continue that run with -resume {tmp_path}' in str(raised.value)


def test_a_new_run_sets_aside_the_records_of_a_run_that_saved_no_checkpoint(tmp_path, caplog):
    (tmp_path / 'log.txt').write_text('old log\n')
    (tmp_path / 'metrics.jsonl').write_text('{"split": "train", "epoch": 1}\n')
    (tmp_path / 'notes.txt').write_text('the user\'s')
    folder = run_folder.RunFolder(str(tmp_path))
    folder.check()
    folder.open(start_logger(is_main=True))
    aside = list(tmp_path.glob('superseded-*'))
    assert len(aside) == 1
    assert (aside[0] / 'log.txt').read_text() == 'old log\n'
    assert (aside[0] / 'metrics.jsonl').read_text() == '{"split": "train", "epoch": 1}\n'
    assert not (tmp_path / 'metrics.jsonl').exists() and (tmp_path / 'notes.txt').read_text() == 'the user\'s'
    assert 'moved log.txt, metrics.jsonl into' in (tmp_path / 'log.txt').read_text()


def rewound_folder(tmp_path, *, best_epoch, best_record):
    """Epoch checkpoints 1..3 and a best file of ``best_epoch`` (a hard link, as runs publish it), resumed from
    checkpoint 1 whose record names ``best_record`` as the best epoch."""
    for epoch in (1, 2, 3):
        save_epoch_file(tmp_path / f'checkpoint-epoch-{epoch}.pdparams', epoch)
    os.link(tmp_path / f'checkpoint-epoch-{best_epoch}.pdparams', tmp_path / 'checkpoint-best.pdparams')
    resumed = tmp_path / 'checkpoint-epoch-1.pdparams'
    checkpoint = {'epoch': 1, 'best': {'acc1': 0.5, 'epoch': best_record, 'weights': 'model'},
                  'written': ['checkpoint-epoch-1.pdparams']}
    return run_folder.RunFolder.resumed(str(tmp_path), checkpoint, str(resumed), keep_checkpoints=2)


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    folder = rewound_folder(tmp_path, best_epoch=3, best_record=1)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    folder.check()
    folder.open(start_logger(is_main=True))
    (aside,) = tmp_path.glob('superseded-*')
    assert sorted(path.name for path in aside.iterdir()) == ['checkpoint-best.pdparams', 'checkpoint-epoch-2.pdparams',
                                                              'checkpoint-epoch-3.pdparams']
    assert all(path.read_bytes() == before[path.name] for path in aside.iterdir())  # moved, not lost
    assert sorted(path.name for path in tmp_path.glob('checkpoint-*')) == ['checkpoint-best.pdparams',
                                                                           'checkpoint-epoch-1.pdparams']
    assert os.path.samefile(tmp_path / 'checkpoint-best.pdparams', tmp_path / 'checkpoint-epoch-1.pdparams')
    assert folder.written == [str(tmp_path / 'checkpoint-epoch-1.pdparams')]


@pytest.mark.parametrize('how', ['copy', 'own file'])
def test_a_best_file_not_linked_to_a_checkpoint_is_set_aside_by_its_epoch(how, tmp_path):
    """A copied best file (a file system without hard links) or one written on its own: its epoch is read."""
    folder = rewound_folder(tmp_path, best_epoch=1, best_record=1)
    best = tmp_path / 'checkpoint-best.pdparams'
    best.unlink()
    if how == 'copy':
        shutil.copyfile(tmp_path / 'checkpoint-epoch-1.pdparams', best)
    else:
        save_epoch_file(best, 2)
    later_mtime(best)
    assert run_folder.files_to_set_aside(str(tmp_path), resume_path=folder.resumed_from, start_epoch=1) == [
        str(tmp_path / 'checkpoint-epoch-2.pdparams'), str(tmp_path / 'checkpoint-epoch-3.pdparams'),
        *([str(best)] if how == 'own file' else [])]


def test_a_resume_into_another_folder_with_checkpoints_is_refused(tmp_path):
    (tmp_path / 'a').mkdir()
    folder = rewound_folder(tmp_path / 'a', best_epoch=2, best_record=2)
    other = tmp_path / 'b'
    other.mkdir()
    save_epoch_file(other / 'checkpoint-epoch-5.pdparams', 5)
    with pytest.raises(run_folder.RunFolderError, match='checkpoint-epoch-5.pdparams'):
        run_folder.RunFolder(str(other), resumed_from=folder.resumed_from, start_epoch=1).check()


def test_the_folder_saves_prunes_and_records_the_best(tmp_path):
    written = {}

    def write(path, records):
        written[os.path.basename(path)] = records
        save_epoch_file(path, int(path.rsplit('-', 1)[-1].split('.')[0]) if 'epoch' in path else 0)

    folder = run_folder.RunFolder(str(tmp_path), keep_checkpoints=2, frozen_weights={'digest': 'd'})
    for epoch, value in zip((1, 2, 3), (0.2, 0.1, 0.3)):
        folder.save_epoch(epoch, write)
        if folder.update_best(epoch, metric='acc1', value=value, weights='model'):
            folder.save_best(epoch, write)
    assert sorted(path.name for path in tmp_path.iterdir()) == ['checkpoint-best.pdparams',
                                                                 'checkpoint-epoch-2.pdparams',
                                                                 'checkpoint-epoch-3.pdparams']
    assert os.path.samefile(tmp_path / 'checkpoint-best.pdparams', tmp_path / 'checkpoint-epoch-3.pdparams')
    assert folder.best == {'acc1': 0.3, 'epoch': 3, 'weights': 'model'}
    assert written['checkpoint-epoch-2.pdparams'] == {
        'best': {'acc1': 0.2, 'epoch': 1, 'weights': 'model'}, 'frozen_weights': {'digest': 'd'},
        'written': [str(tmp_path / 'checkpoint-epoch-1.pdparams'), str(tmp_path / 'checkpoint-epoch-2.pdparams')]}
    idle = run_folder.RunFolder(str(tmp_path / 'other'), writes=False)
    idle.save_epoch(1, write)
    idle.record({'epoch': 1})
    assert not (tmp_path / 'other').exists()
