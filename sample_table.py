"""The checked samples of a split as one compact table, and how the processes of a run share it: the lists are
read and checked once per run (``lists_checked_once``, ``lists_checked_once_per_machine``), and every other process
maps the first one's saved table instead of checking them again."""
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import paddle.distributed as dist

SAMPLE_TABLES_ENV = 'BEIT_SAMPLE_TABLES'  # a folder where the processes of a run share their checked samples


class Sample(NamedTuple):
    path: str
    label: int
    line: int = 0  # line in the list file; 0 for a sample found in a class folder


class SampleTable(Sequence):
    """A split's samples in four flat arrays (UTF-8 relative paths one per line, where each starts, labels, lines)
    instead of a Python object per sample: ImageNet's 1.28M training samples take 56 MB, not ~280 MB, and
    DataLoader workers reading them touch no reference counts, so their copy-on-write pages stay shared. Saved
    to a folder, it is mapped back read-only (``load``): processes on one machine share one copy."""

    ARRAYS = ('paths', 'offsets', 'labels', 'lines')

    def __init__(self, root: str, paths: np.ndarray, offsets: np.ndarray, labels: np.ndarray, lines: np.ndarray):
        self.root, self.paths, self.offsets, self.labels, self.lines = root, paths, offsets, labels, lines

    @classmethod
    def from_entries(cls, root: str, entries: Sequence[tuple[int, str, int]]) -> 'SampleTable':
        """From (list line, path relative to ``root``, label) triples; line 0 for a sample not from a list."""
        paths = np.frombuffer('\n'.join(path for _, path, _ in entries).encode('utf-8'), dtype=np.uint8)
        offsets = np.concatenate([[0], np.flatnonzero(paths == ord('\n')) + 1, [len(paths) + 1]])
        return cls(root, paths, offsets, np.array([label for _, _, label in entries], dtype=np.int32),
                   np.array([line for line, _, _ in entries], dtype=np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f'sample {index} of {len(self)}')
        index %= len(self)
        relative_path = self.paths[self.offsets[index]:self.offsets[index + 1] - 1].tobytes().decode('utf-8')
        return Sample(os.path.join(self.root, relative_path), int(self.labels[index]), int(self.lines[index]))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for name in self.ARRAYS:
            np.save(os.path.join(folder, f'{name}.npy'), getattr(self, name))
        with open(os.path.join(folder, 'root.txt'), 'w', encoding='utf-8') as f:
            f.write(self.root)

    @classmethod
    def load(cls, folder: str) -> 'SampleTable':
        with open(os.path.join(folder, 'root.txt'), encoding='utf-8') as f:
            root = f.read()
        return cls(root, *(np.load(os.path.join(folder, f'{name}.npy'), mmap_mode='r') for name in cls.ARRAYS))


def _shared_table_folder(source: str, num_classes: int | None) -> str | None:
    folder = os.environ.get(SAMPLE_TABLES_ENV)
    if not folder:
        return None
    key = hashlib.sha256(f'{os.path.abspath(source)}\n{num_classes}'.encode()).hexdigest()[:16]
    return os.path.join(folder, key)


def checked_once(source: str, num_classes: int | None, check: Callable[[], SampleTable]) -> SampleTable:
    """``check()``, or under SAMPLE_TABLES_ENV the table another process of this run checked for the same source
    (mapped, shared); the first process to check a source saves its table there for the others."""
    folder = _shared_table_folder(source, num_classes)
    if folder is None:
        return check()
    if os.path.isdir(folder):
        return SampleTable.load(folder)
    table = check()
    partial = f'{folder}.tmp{os.getpid()}'
    table.save(partial)
    os.replace(partial, folder)  # readers see a complete table or none
    return SampleTable.load(folder)


@contextlib.contextmanager
def lists_checked_once(folder: str):
    """Within it, the lists are checked once: by the first process that needs each, whose table the others (this
    process's children included: the environment is inherited) then map. The folder is removed on leaving."""
    os.environ[SAMPLE_TABLES_ENV] = folder
    try:
        yield
    finally:
        os.environ.pop(SAMPLE_TABLES_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def lists_checked_once_per_machine(local_rank: int, multi_process: bool):
    """For processes started by paddle.distributed.launch (no parent of ours checks the lists first): local rank 0
    checks them while the machine's other processes wait, then they map its tables. Every process passes both
    barriers whatever happens, so a bad list fails them all (the others check it again for their message)."""
    if not multi_process or SAMPLE_TABLES_ENV in os.environ:
        yield
        return
    folder = os.path.join(tempfile.gettempdir(), f'beit-sample-tables-{os.getppid()}')
    os.environ[SAMPLE_TABLES_ENV] = folder
    try:
        if local_rank != 0:
            dist.barrier()
        try:
            yield
        finally:
            if local_rank == 0:
                dist.barrier()
            dist.barrier()  # everyone has mapped the tables
    finally:
        os.environ.pop(SAMPLE_TABLES_ENV, None)
        if local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
