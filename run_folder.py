"""The output folder of a run, and everything written into it: one live run at a time, checkpoints that are never
overwritten, the newest KEEP_CHECKPOINTS of them and the best, metrics.jsonl, and the rules that keep a folder
consistent when runs are killed, resumed or restarted.

The rules, as a user meets them:
- ``-resume DIR`` (or a checkpoint in DIR) continues in DIR (cli.py makes it the output folder unless -output says
  otherwise); from DIR's latest epoch checkpoint, or from its checkpoint-best.pdparams when the run died before
  its first epoch checkpoint.
- A resume from an earlier checkpoint of the folder continues from there: the later epoch checkpoints (and a best
  file of a later epoch) move into ``superseded-<time>/`` and the later metrics lines into
  metrics-superseded.jsonl. Nothing is deleted; what moved can be moved back.
- A new run never overwrites checkpoints: a folder holding another run's is refused, and the message says how to
  continue that run. A folder holding only the records of a run that saved no checkpoint (log, metrics) is
  reused: those records move into ``superseded-<time>/`` first.

The lock is ``run.lock``, held with ``flock`` by the run's main process for its whole life: the kernel releases it
when that process dies however it dies, so a lock left by a dead run never blocks, and the file names the pid of
the live one. (flock is per machine; on network file systems that do not support it, it locks nothing.)
"""
import fcntl
import json
import os
import re
import time
from collections.abc import Callable

import safe_pickle
from errors import BadInputError
from utils import append_jsonl, attach_log_file, publish_copy, write_json, write_lines_atomically

LOCK_FILE = 'run.lock'
LOG_FILE = 'log.txt'
METRICS_FILE = 'metrics.jsonl'
SUPERSEDED_FILE = 'metrics-superseded.jsonl'
PARAM_GROUPS_FILE = 'param_groups.json'
BEST_CHECKPOINT = 'checkpoint-best.pdparams'  # the checkpoint of the best validation so far (objective's metric)
CHECKPOINT_PATTERN = re.compile(r'^checkpoint-epoch-(\d+)\.pdparams$')
_RECORD_FILES = (LOG_FILE, METRICS_FILE, SUPERSEDED_FILE, PARAM_GROUPS_FILE)  # what a run writes besides checkpoints
# What this project writes through a temporary file: name.tmp<pid> (utils.save_atomically, write_json, ...).
_TEMP_FILE = re.compile(r'^(checkpoint-epoch-\d+\.pdparams|checkpoint-best\.pdparams|param_groups\.json|'
                        + re.escape(METRICS_FILE) + r')\.tmp(\d+)$')


class RunFolderError(BadInputError):
    """An output folder (or -resume path) that the run cannot use as it is: the message says what to do."""


class RunFolderBusyError(RunFolderError):
    """The output folder is being written by a live run."""


def checkpoint_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, f'checkpoint-epoch-{epoch}.pdparams')


def checkpoints_in(folder: str) -> dict:
    """{epoch: path} of the epoch checkpoints in ``folder`` (none if it does not exist)."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        match = CHECKPOINT_PATTERN.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(folder, name)
    return found


def resolve_resume_path(path: str) -> str:
    """-resume takes a checkpoint file, or a run folder meaning its latest epoch checkpoint (its best file when the
    run died before its first epoch checkpoint)."""
    if os.path.isdir(path):
        found = checkpoints_in(path)
        if found:
            return found[max(found)]
        best = os.path.join(path, BEST_CHECKPOINT)
        if os.path.isfile(best):
            return best
        raise RunFolderError(f'-resume: the folder {path} holds no checkpoint (checkpoint-epoch-N.pdparams or '
                             f'{BEST_CHECKPOINT}): its run saved none; start a new run instead')
    if not os.path.isfile(path):
        raise RunFolderError(f'-resume: checkpoint not found: {path}')
    return path


def resumed_folder(resume: str) -> str:
    """The run folder a -resume path continues: the folder itself, or the one holding the checkpoint."""
    return resume if os.path.isdir(resume) else os.path.dirname(resume) or '.'


def keep_newest(written: list[str], keep: int) -> list[str]:
    """Delete all but the newest ``keep`` of ``written`` (epoch checkpoints this run wrote, oldest first; 0 keeps
    all) and return the kept ones. Call it once the newest is on disk: a crash in between leaves one too many."""
    if keep <= 0 or len(written) <= keep:
        return written
    for path in written[:-keep]:
        if os.path.exists(path):
            os.remove(path)
    return written[-keep:]


def _same_folder(path: str, folder: str) -> bool:
    return os.path.isdir(folder) and os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)


def _best_is_later(best: str, resume_path: str, start_epoch: int, checkpoints: dict) -> bool:
    """Whether the best file holds an epoch after ``start_epoch``. Cheap where it can be: the resumed file itself,
    a file not written after it (a hard link keeps its source's time), a link to an epoch checkpoint; else its
    epoch is read (safe_pickle)."""
    if os.path.samefile(best, resume_path) or os.stat(best).st_mtime_ns <= os.stat(resume_path).st_mtime_ns:
        return False
    for epoch, other in checkpoints.items():
        if os.path.samefile(best, other):
            return epoch > start_epoch
    try:
        return int(safe_pickle.load(best, return_numpy=True)['epoch']) > start_epoch
    except Exception as err:  # pickle and paddle raise many types for truncated or foreign files
        raise RunFolderError(f'cannot read the epoch of {best} ({err}): move it out of the folder to resume') from err


def _refuse_to_overwrite(folder: str, checkpoints: dict) -> None:
    """A folder holding another run's checkpoints: refused, saying how to continue that run."""
    if checkpoints:
        held = f'checkpoint-epoch-{max(checkpoints)}.pdparams'
    elif os.path.exists(os.path.join(folder, BEST_CHECKPOINT)):
        held = f'{BEST_CHECKPOINT}: that run died before its first epoch checkpoint'
    else:
        return
    raise RunFolderError(f'{folder} already holds another run\'s checkpoints ({held}), which a new run would '
                         f'overwrite: continue that run with -resume {folder}, or start afresh with another -output')


def check_is_folder(folder: str) -> None:
    """-output must name a folder (new or not), never a file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunFolderError(f'-output {folder} is a file: a run writes a folder (log, metrics, checkpoints); '
                             'name a folder')


def files_to_set_aside(folder: str, *, resume_path: str = '', start_epoch: int = 0) -> list[str]:
    """What must move into superseded-<time>/ before a training run starts in ``folder`` (resumed from
    ``resume_path`` after ``start_epoch`` epochs, or new): raises RunFolderError where the rules above refuse."""
    if not os.path.exists(folder):
        return []
    check_is_folder(folder)
    checkpoints = checkpoints_in(folder)
    if not (resume_path and _same_folder(resume_path, folder)):
        _refuse_to_overwrite(folder, checkpoints)
        return [os.path.join(folder, name) for name in _RECORD_FILES if os.path.exists(os.path.join(folder, name))]
    later = [checkpoints[epoch] for epoch in sorted(checkpoints) if epoch > start_epoch]
    best = os.path.join(folder, BEST_CHECKPOINT)
    if os.path.exists(best) and _best_is_later(best, resume_path, start_epoch, checkpoints):
        later.append(best)
    return later


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


def _busy(folder: str, path: str) -> RunFolderBusyError:
    with open(path, encoding='utf-8', errors='replace') as f:
        holder = f.read().strip() or 'a process that has not written its pid yet'
    return RunFolderBusyError(f'{folder} is in use by a live run ({holder}): wait for it to end, stop it, or '
                              'choose another -output')


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


def set_aside(paths: list[str], folder: str) -> str:
    """Move ``paths`` into a new superseded-<time>/ of ``folder`` (renames: nothing copied, nothing lost) and
    return it ('' when there is nothing to move)."""
    if not paths:
        return ''
    base = os.path.join(folder, time.strftime('superseded-%Y%m%d-%H%M%S'))
    target, suffix = base, 1
    while os.path.exists(target):
        suffix += 1
        target = f'{base}-{suffix}'
    os.makedirs(target)
    for path in paths:
        os.replace(path, os.path.join(target, os.path.basename(path)))
    return target


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


# write(path, records): writes a complete checkpoint at ``path`` holding ``records`` (RunFolder.records).
CheckpointWriter = Callable[[str, dict], None]


class RunFolder:
    """One run's output folder. Every process holds one (all track the best alike); only the main process
    (``writes``) touches the disk. An evaluation (not ``training``) only adds to log.txt and metrics.jsonl. A
    resumed run passes what its checkpoint recorded: ``best`` ({<metric>, epoch, weights}), ``written`` (the epoch
    checkpoints of the run still in the folder, oldest first, the ones KEEP_CHECKPOINTS may delete) and
    ``resumed_from``; ``frozen_weights`` ({pretrained, digest}) identifies the frozen part of a partly frozen model.
    Checkpoints carry ``records()`` so that a resume restores all of it."""

    def __init__(self, path: str, *, writes: bool = True, training: bool = True, keep_checkpoints: int = 0,
                 best: dict | None = None, written: list[str] = (), resumed_from: str = '', start_epoch: int = 0,
                 frozen_weights: dict | None = None):
        self.path = path
        self.writes = writes
        self.training = training
        self.keep_checkpoints = keep_checkpoints
        self.best = best
        self.written = list(written)
        self.resumed_from = resumed_from
        self.start_epoch = start_epoch
        self.frozen_weights = frozen_weights
        self.last_checkpoint = resumed_from  # the newest checkpoint this run can fall back on
        self._lock = None

    @classmethod
    def resumed(cls, path: str, checkpoint: dict, resume_path: str, **kwargs) -> 'RunFolder':
        """The folder of a run resumed from ``checkpoint`` (read from ``resume_path``)."""
        written = []
        if _same_folder(resume_path, path):  # the checkpoints the run wrote here, which retention may delete
            written = [os.path.join(path, name) for name in checkpoint.get('written') or ()]
        return cls(path, best=checkpoint.get('best'), written=[p for p in written if os.path.isfile(p)],
                   resumed_from=resume_path, start_epoch=checkpoint['epoch'], **kwargs)

    def check(self) -> None:
        """What would stop the run from writing here, raised before anything is written. Every process of a training
        run checks (so all stop alike), before paddle.DataParallel's first broadcast, which none passes before all
        arrive: the main process cannot have locked the folder or moved files yet. An evaluation has no such
        barrier: its main process checks."""
        if not (self.writes or self.training):
            return
        check_free(self.path)
        if self.training:
            files_to_set_aside(self.path, resume_path=self.resumed_from, start_epoch=self.start_epoch)
        else:
            check_is_folder(self.path)

    def open(self, log) -> None:
        """Create and lock the folder, set aside what the rules supersede, and log into log.txt (``log`` is the
        run's logger); a resumed run's repeated epochs move out of metrics.jsonl."""
        if not self.writes:
            return
        os.makedirs(self.path, exist_ok=True)
        self._lock = lock(self.path)
        removed = remove_stale_temp_files(self.path)
        moved = files_to_set_aside(self.path, resume_path=self.resumed_from, start_epoch=self.start_epoch) \
            if self.training else []
        target = set_aside(moved, self.path)
        attach_log_file(log, os.path.join(self.path, LOG_FILE))
        if removed:
            log.info(f'removed temporary files of a run that died while writing: {", ".join(removed)}')
        if target:
            log.info(f'moved {", ".join(os.path.basename(path) for path in moved)} into {target} (superseded by '
                     'this run; move them back to undo)')
        if self.resumed_from:
            count = supersede_records_after(self.path, self.start_epoch)
            log.info(f'resumed after epoch {self.start_epoch}: log lines of later epochs above this one are '
                     f'superseded; {count} metrics lines of them moved to {SUPERSEDED_FILE}')
            self._republish_best(log)

    def _republish_best(self, log) -> None:
        """Make checkpoint-best.pdparams hold the epoch the resumed checkpoint records as the best: a run killed
        between its epoch checkpoint and the best file left an older one (publishing the best first would lose the
        older best's weights when only the best file holds them), and a rewound run set a later one aside."""
        if self.best is None or not _same_folder(self.resumed_from, self.path):
            return
        epoch, best_path = self.best['epoch'], os.path.join(self.path, BEST_CHECKPOINT)
        source = self.resumed_from if epoch == self.start_epoch else checkpoint_path(self.path, epoch)
        if os.path.exists(best_path) and (epoch != self.start_epoch or os.path.samefile(source, best_path)):
            return  # it holds that epoch: it was written at it, and nothing later replaced it
        if not os.path.exists(source):
            log.warning(f'the best epoch so far ({epoch}) has no checkpoint left in {self.path} (KEEP_CHECKPOINTS '
                        f'pruned it): {BEST_CHECKPOINT} is written again at the next better evaluation')
            return
        publish_copy(source, best_path)
        log.info(f'saved {best_path} again from {source}, the epoch {epoch} it records as the best')

    def records(self, written: list[str] | None = None) -> dict:
        """What a checkpoint carries of the folder's state, for the resumed run."""
        return {'best': self.best, 'written': self.written if written is None else written,
                'frozen_weights': self.frozen_weights}

    def write_json(self, name: str, obj) -> None:
        if self.writes:
            write_json(os.path.join(self.path, name), obj)

    def record(self, record: dict) -> None:
        """A line of metrics.jsonl."""
        if self.writes:
            append_jsonl(os.path.join(self.path, METRICS_FILE), record)

    def save_epoch(self, epoch: int, write: CheckpointWriter) -> str:
        """The epoch's checkpoint; then, with it on disk, the oldest of this run's beyond KEEP_CHECKPOINTS go (the
        checkpoint lists them, so a run killed in between deletes them once resumed). Returns its path."""
        path = checkpoint_path(self.path, epoch)
        if self.writes:
            written = [*self.written, path]
            write(path, self.records(written))
            self.written = keep_newest(written, self.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def update_best(self, epoch: int, *, metric: str, value: float, weights: str) -> bool:
        """Whether ``value`` of ``metric`` (higher is better) beats the best so far; if so it becomes the best."""
        improved = self.best is None or value > self.best[metric]
        if improved:
            self.best = {metric: value, 'epoch': epoch, 'weights': weights}
        return improved

    def save_best(self, epoch: int, write: CheckpointWriter) -> str:
        """checkpoint-best.pdparams: a link to (or copy of) the epoch's checkpoint, or a checkpoint of its own.
        Returns its path."""
        path = os.path.join(self.path, BEST_CHECKPOINT)
        if not self.writes:
            return path
        if self.last_checkpoint == checkpoint_path(self.path, epoch):
            publish_copy(self.last_checkpoint, path)
        else:
            write(path, self.records())
        return path
