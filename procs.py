"""The process tree below a pid, read from /proc (Linux): for the startup benchmark and the tests that kill runs."""
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
