"""Processes as Linux's /proc shows them: the tree below a pid (for the startup benchmark and the tests that kill
runs), and this process's resident memory and its peak (for the memory benchmarks)."""
import contextlib
from pathlib import Path

_ENDED = (FileNotFoundError, ProcessLookupError)  # what reading /proc of a process or thread that ended raises


def children(pid: int) -> list[int]:
    """The child pids of every thread of ``pid``. Processes and threads end while the walk reads them: one that
    ended meanwhile has no children, rather than an error, and hides none of the others'."""
    found = []
    with contextlib.suppress(*_ENDED):
        for task in Path(f'/proc/{pid}/task').iterdir():
            with contextlib.suppress(*_ENDED):
                found += map(int, (task / 'children').read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, each followed by its own descendants."""
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def _status_mb(field: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024.0  # kB


def start_peak_memory() -> float:
    """Reset this process's peak RSS (clear_refs) and return the RSS it starts from, in MB."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return _status_mb('VmRSS')


def peak_memory_mb() -> float:
    """This process's peak RSS, in MB (since it started or since ``start_peak_memory``)."""
    return _status_mb('VmHWM')
