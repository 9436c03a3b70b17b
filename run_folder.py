"""One live run per output folder, and a folder that stays consistent when runs are killed and resumed.

The lock is ``run.lock``, held with ``flock`` by the run's main process for its whole life: the kernel releases it
when that process dies however it dies, so a lock left by a dead run never blocks, and the file names the pid of
the live one. (flock is per machine; on network file systems that do not support it, it locks nothing.)
"""
import fcntl
import json
import os
import re

from errors import BadInputError
from utils import write_lines_atomically

LOCK_FILE = 'run.lock'
METRICS_FILE = 'metrics.jsonl'
SUPERSEDED_FILE = 'metrics-superseded.jsonl'
# What this project writes through a temporary file: name.tmp<pid> (utils.save_atomically, write_json, ...).
_TEMP_FILE = re.compile(r'^(checkpoint-epoch-\d+\.pdparams|checkpoint-best\.pdparams|param_groups\.json|'
                        + re.escape(METRICS_FILE) + r')\.tmp(\d+)$')


class RunFolderBusyError(BadInputError):
    """The output folder is being written by a live run."""


def _busy(folder: str, path: str) -> RunFolderBusyError:
    with open(path, encoding='utf-8', errors='replace') as f:
        holder = f.read().strip() or 'a process that has not written its pid yet'
    return RunFolderBusyError(f'{folder} is in use by a live run ({holder}): wait for it to end, stop it, or '
                              'choose another -output')


def check_free(folder: str) -> None:
    """Raise RunFolderBusyError when a live run holds ``folder``'s lock; writes nothing."""
    path = os.path.join(folder, LOCK_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder, path) from None
        fcntl.flock(f, fcntl.LOCK_UN)


def lock(folder: str):
    """Take ``folder``'s lock for this process's life (keep the returned file open); RunFolderBusyError if taken."""
    path = os.path.join(folder, LOCK_FILE)
    handle = open(path, 'a+', encoding='utf-8')  # noqa: SIM115 (held open until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise _busy(folder, path) from None
    handle.truncate(0)
    handle.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    handle.flush()
    return handle


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the temporary files of runs that died while writing (call it holding the lock: no live run of this
    folder is writing one); only names this project writes. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMP_FILE.match(name)
        if match and int(match.group(2)) != os.getpid():
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def supersede_records_after(folder: str, epoch: int) -> int:
    """A run resumed after ``epoch`` repeats the later epochs: their lines move from metrics.jsonl to
    metrics-superseded.jsonl (appended, so nothing is lost), leaving each epoch once. Returns the count moved."""
    path = os.path.join(folder, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, encoding='utf-8') as f:
        lines = f.read().splitlines(keepends=True)
    later = [line for line in lines if _epoch_of(line) > epoch]
    if later:
        with open(os.path.join(folder, SUPERSEDED_FILE), 'a', encoding='utf-8') as f:
            f.writelines(later)
            f.flush()
            os.fsync(f.fileno())
        write_lines_atomically(path, [line for line in lines if _epoch_of(line) <= epoch])
    return len(later)


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line).get('epoch') or 0)
    except (ValueError, AttributeError, TypeError):
        return 0  # not a record of ours: kept where it is
