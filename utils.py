"""Run utilities shared by the scripts: crash-safe files, the run log, metrics lines, CPU threads, seeds, progress."""
import ctypes
import json
import logging
import logging.handlers
import os
import random
import shutil
import signal
import sys

import numpy as np
import paddle

from paddle_internals import set_cpu_threads

LOGGER_NAME = 'beit'
LOG_FORMAT = '%(asctime)s %(message)s'


def save_atomically(obj, path: str) -> None:
    """paddle.save to a temporary file next to ``path``, flushed to disk, then renamed over it: a crash at any
    moment leaves either the old file or the complete new one, never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = f'{path}.tmp{os.getpid()}'
    try:
        paddle.save(obj, tmp_path)
        with open(tmp_path, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def publish_copy(source: str, path: str) -> None:
    """``path`` becomes a copy of ``source`` atomically: a hard link (no extra disk) where the file system has
    them, else a copied file; the previous ``path`` stays complete until the rename."""
    tmp_path = f'{path}.tmp{os.getpid()}'
    try:
        try:
            os.link(source, tmp_path)
        except OSError:
            shutil.copyfile(source, tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def append_jsonl(path: str, record: dict) -> None:
    """One JSON object per line, appended: earlier records of the run (or of runs before it) are kept."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def write_lines_atomically(path: str, lines: list[str]) -> None:
    """Replace the text file ``path`` by ``lines`` (each with its newline) through a flushed temporary file."""
    tmp_path = f'{path}.tmp{os.getpid()}'
    with open(tmp_path, 'w', encoding='utf-8') as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def write_json(path: str, obj) -> None:
    tmp_path = f'{path}.tmp{os.getpid()}'
    with open(tmp_path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp_path, path)


def start_logger(is_main: bool) -> logging.Logger:
    """The run logger: on the main process INFO to stdout and into a buffer that ``attach_log_file`` flushes to
    log.txt once the inputs are checked (a run refused for bad input writes nothing); other processes report
    warnings only. Errors go to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    close_logger(logger)
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    for handler in (console, errors):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
    if is_main:
        logger.addHandler(logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1))
    return logger


def attach_log_file(logger: logging.Logger, path: str) -> None:
    """Append (never truncate) to ``path`` from now on, starting with what was logged while the run set up."""
    file_handler = logging.FileHandler(path, mode='a', encoding='utf-8')
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.setTarget(file_handler)
            handler.flush()
            logger.removeHandler(handler)
    logger.addHandler(file_handler)


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def cpu_threads_per_process(local_processes: int = 1) -> int:
    """Each process's share of this machine's cores (Paddle would use one thread unless told).

    An OMP_NUM_THREADS above 1 set by the user wins; Paddle itself sets it to 1 at import when it is unset.
    """
    requested = int(os.environ.get('OMP_NUM_THREADS', '1') or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return requested if requested > 1 else max(1, cores // max(1, local_processes))


def use_all_cpu_cores(local_processes: int = 1) -> int:
    """Set Paddle's CPU threads to this process's share of the cores; returns the count."""
    threads = cpu_threads_per_process(local_processes)
    set_cpu_threads(threads)
    return threads


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(*_) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing): a training process
    must not outlive the launcher a scheduler killed, nor a loader worker its training process. Accepts and
    ignores DataLoader's worker id, to serve as its worker_init_fn."""
    if not sys.platform.startswith('linux'):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends on every part, e.g. (SEED, epoch, rank): the same parts give the same seed."""
    return int(np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and paddle's global generators (augmentations, sampler workers, drop path)."""
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (never in log files)."""

    def __init__(self, total: int, label: str, enabled: bool, width: int = 30):
        self.total = max(total, 1)
        self.label = label
        self.width = width
        self.enabled = enabled and sys.stderr.isatty()

    def show(self, done: int) -> None:
        if not self.enabled:
            return
        filled = self.width * done // self.total
        sys.stderr.write(f'\r{self.label} [{"#" * filled}{"." * (self.width - filled)}] {done}/{self.total}')
        sys.stderr.flush()

    def clear(self) -> None:
        """Blank the bar's line, e.g. before a log line is printed."""
        if self.enabled:
            sys.stderr.write('\r' + ' ' * (len(self.label) + self.width + 24) + '\r')
            sys.stderr.flush()
