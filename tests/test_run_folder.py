"""run_folder.py: the lock of a live run, what start-up cleans, superseded metrics lines kept aside."""
import json

import pytest

import run_folder


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
