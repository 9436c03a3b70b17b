"""sample_table.py: the compact table of a split's samples, saved and mapped back, and the lists checked once per
run (by the first process that needs each) or once per machine (local rank 0 while the others wait)."""
import os

import numpy as np
import pytest

import sample_table
from sample_table import SAMPLE_TABLES_ENV, Sample, SampleTable, checked_once, lists_checked_once

ENTRIES = [(3, 'a b/c.png', 2), (5, 'été/ö.jpg', 0), (0, '/elsewhere/x.png', 1)]


def _samples(root: str) -> list[Sample]:
    return [Sample(os.path.join(root, path), label, line) for line, path, label in ENTRIES]


def test_a_table_gives_its_samples_by_index_and_slice():
    table = SampleTable.from_entries('/data', ENTRIES)
    expected = _samples('/data')
    assert len(table) == 3 and list(table) == expected
    assert (table[-1], table[-3]) == (expected[2], expected[0])
    assert table[1:] == expected[1:] and table[::-2] == expected[::-2]
    for outside in (3, -4):
        with pytest.raises(IndexError, match=f'sample {outside} of 3'):
            table[outside]


def test_a_saved_table_is_mapped_back_read_only(tmp_path):
    SampleTable.from_entries('/data', ENTRIES).save(str(tmp_path / 'table'))
    loaded = SampleTable.load(str(tmp_path / 'table'))
    assert list(loaded) == _samples('/data')
    assert all(isinstance(getattr(loaded, name), np.memmap) and not getattr(loaded, name).flags.writeable
               for name in SampleTable.ARRAYS)


class CountingCheck:
    """Stands in for a list's check: counts its calls and gives the table of ENTRIES under ``root``."""

    def __init__(self, root: str):
        self.root, self.calls = root, 0

    def __call__(self) -> SampleTable:
        self.calls += 1
        return SampleTable.from_entries(self.root, ENTRIES)


def test_outside_lists_checked_once_every_call_checks(monkeypatch):
    monkeypatch.delenv(SAMPLE_TABLES_ENV, raising=False)
    check = CountingCheck('/data')
    assert [list(checked_once('train_list.txt', 3, check)) for _ in range(2)] == [_samples('/data')] * 2
    assert check.calls == 2


def test_within_lists_checked_once_each_source_and_class_count_is_checked_once(tmp_path, monkeypatch):
    monkeypatch.delenv(SAMPLE_TABLES_ENV, raising=False)
    folder = tmp_path / 'tables'
    train, val = CountingCheck('/data'), CountingCheck('/data')
    with lists_checked_once(str(folder)):
        assert os.environ[SAMPLE_TABLES_ENV] == str(folder)
        for _ in range(2):
            assert list(checked_once('train_list.txt', 3, train)) == _samples('/data')
            assert list(checked_once('val_list.txt', 3, val)) == _samples('/data')
        assert (train.calls, val.calls) == (1, 1)
        checked_once('train_list.txt', None, train)  # pre-training's labels: checked on their own terms
        assert train.calls == 2
    assert SAMPLE_TABLES_ENV not in os.environ and not folder.exists()


def test_a_shared_table_is_seen_whole_or_not_at_all(tmp_path, monkeypatch):
    """While the first process writes its table, the folder the others look for does not exist yet."""
    monkeypatch.delenv(SAMPLE_TABLES_ENV, raising=False)
    folder = tmp_path / 'tables'
    during_save = []
    save = SampleTable.save

    def save_and_look(table, path):
        save(table, path)
        during_save.append(os.listdir(folder))

    monkeypatch.setattr(SampleTable, 'save', save_and_look)
    with lists_checked_once(str(folder)):
        checked_once('train_list.txt', 3, CountingCheck('/data'))
        published = os.listdir(folder)
    assert len(during_save) == 1 and all('.tmp' in name for name in during_save[0])
    assert len(published) == 1 and '.tmp' not in published[0]


class Barriers:
    """Stands in for paddle.distributed.barrier: counts the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


@pytest.fixture
def barriers(tmp_path, monkeypatch):
    monkeypatch.delenv(SAMPLE_TABLES_ENV, raising=False)
    monkeypatch.setattr(sample_table.tempfile, 'gettempdir', lambda: str(tmp_path))
    stand_in = Barriers()
    monkeypatch.setattr(sample_table.dist, 'barrier', stand_in)
    return stand_in


@pytest.mark.parametrize(('local_rank', 'waits_before'), [(0, 0), (1, 1), (3, 1)])
def test_local_rank_0_checks_first_and_every_process_passes_both_barriers(barriers, tmp_path, local_rank,
                                                                          waits_before):
    folder = tmp_path / f'beit-sample-tables-{os.getppid()}'
    with sample_table.lists_checked_once_per_machine(local_rank, multi_process=True):
        waited = barriers.calls
        assert os.environ[SAMPLE_TABLES_ENV] == str(folder)
        folder.mkdir()
    assert (waited, barriers.calls) == (waits_before, 2)
    assert SAMPLE_TABLES_ENV not in os.environ
    assert folder.exists() == (local_rank != 0)  # local rank 0 removes the tables


@pytest.mark.parametrize('local_rank', [0, 1])
def test_a_failed_check_still_passes_both_barriers(barriers, local_rank):
    with pytest.raises(ValueError, match='bad list'), \
            sample_table.lists_checked_once_per_machine(local_rank, multi_process=True):
        raise ValueError('bad list')
    assert barriers.calls == 2 and SAMPLE_TABLES_ENV not in os.environ


def test_one_process_or_tables_already_shared_need_no_barrier(barriers, tmp_path, monkeypatch):
    with sample_table.lists_checked_once_per_machine(0, multi_process=False):
        assert SAMPLE_TABLES_ENV not in os.environ
    monkeypatch.setenv(SAMPLE_TABLES_ENV, str(tmp_path / 'from the launcher'))
    with sample_table.lists_checked_once_per_machine(1, multi_process=True):
        assert os.environ[SAMPLE_TABLES_ENV] == str(tmp_path / 'from the launcher')
    assert barriers.calls == 0 and os.environ[SAMPLE_TABLES_ENV] == str(tmp_path / 'from the launcher')
