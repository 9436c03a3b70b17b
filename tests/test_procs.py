"""The /proc walker that the startup benchmark and the kill tests share, against processes that end mid-walk."""
import os
import subprocess
import time
from pathlib import Path

import procs


def test_the_tree_below_a_process_is_found_parents_first():
    shell = subprocess.Popen(['sh', '-c', 'sleep 30 & wait'])
    try:
        deadline = time.time() + 10
        while not procs.children(shell.pid):
            assert time.time() < deadline, 'the shell started no child'
            time.sleep(0.01)
        sleeper, = procs.children(shell.pid)
        assert shell.pid in procs.children(os.getpid())
        assert procs.descendants(shell.pid) == [sleeper]
        below_us = procs.descendants(os.getpid())
        assert below_us[below_us.index(shell.pid) + 1] == sleeper  # each process followed by its own
    finally:
        shell.kill()
        shell.wait()


def test_a_process_that_ended_has_no_children():
    ended = subprocess.Popen(['true'])
    ended.wait()  # reaped: its /proc folder is gone
    assert procs.children(ended.pid) == []
    assert procs.descendants(ended.pid) == []


def test_a_thread_that_ends_mid_walk_hides_none_of_the_others_children(tmp_path, monkeypatch):
    tasks = tmp_path / 'proc' / '10' / 'task'
    for thread, kids in (('10', '11 12'), ('13', None), ('14', '15')):  # thread 13 ended after the listing
        (tasks / thread).mkdir(parents=True)
        if kids is not None:
            (tasks / thread / 'children').write_text(f'{kids} \n')
    monkeypatch.setattr(procs, 'Path', lambda path: tmp_path / Path(path).relative_to('/'))
    assert sorted(procs.children(10)) == [11, 12, 15]
