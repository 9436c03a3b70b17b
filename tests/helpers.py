"""What the test files share: the repository root, the tiny config, the real photos, small data files, file
checks and a run killed in its subprocess. (Fixtures and the environment set-up stay in conftest.py.)"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import engine
import safe_pickle
from config import get_config, merge_opts, validate_config
from image_files import load_rgb_image
from transforms import get_val_transforms, host_normalise

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / 'configs' / 'beit_tiny_patch4_32.yaml')
PHOTO_DIR = Path(os.environ.get('BEIT_TEST_PHOTOS', ROOT / 'tests' / 'photos'))
# The environment of the scripts run in subprocesses: they share the cores between their processes (an
# OMP_NUM_THREADS above 1 would override that), and this Python's scripts come first on PATH.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'}


def tiny_config(*opts, **train):
    """The tiny config with ``KEY VALUE`` overrides as -opts takes them and TRAIN keys by keyword, checked as a
    run checks it."""
    config = get_config(TINY_CONFIG)
    merge_opts(config, [*opts, *(item for key, value in train.items() for item in (f'TRAIN.{key}', value))])
    validate_config(config)
    return config


def records(output, split: str = 'train') -> list[dict]:
    """The metrics.jsonl records of a run folder's ``split``, in order."""
    lines = (Path(output) / 'metrics.jsonl').read_text().splitlines()
    return [record for record in map(json.loads, lines) if record['split'] == split]


def assert_same_state(resumed: dict, expected: dict, part: str) -> None:
    """Every tensor of a checkpoint's ``part`` bit-identical, every other entry equal."""
    assert resumed.keys() == expected.keys(), part
    for name, value in expected.items():
        if isinstance(value, paddle.Tensor):
            np.testing.assert_array_equal(resumed[name].numpy(), value.numpy(), err_msg=f'{part} {name}')
        else:
            assert resumed[name] == value, f'{part} {name}'


class Killed(BaseException):
    """What a SIGKILL does to an in-process run at that point: nothing after it runs (BaseException: nothing
    catches it)."""


@contextlib.contextmanager
def killed_after_steps(monkeypatch, count: int):
    """The run inside the block is killed (Killed) just after its ``count``-th optimizer step, which must happen."""
    step = engine._optimizer_step
    calls = []

    def step_then_kill(trainer, applied):
        step(trainer, applied)
        calls.append(1)
        if len(calls) == count:
            raise Killed
    monkeypatch.setattr(engine, '_optimizer_step', step_then_kill)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(engine, '_optimizer_step', step)


def kill_during(cmd, log: Path, line: str, timeout=120) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``line`` appears in ``log`` (a run killed mid-epoch)."""
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not (log.exists() and line in log.read_text()):
            assert process.poll() is None, 'the run ended before it could be killed'
            assert time.time() < deadline, f'no "{line}" in {log}'
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL


def photo_batch(paths, config) -> np.ndarray:
    """Photo files as this project's evaluation feeds them to the model: the val transform, then normalised."""
    transform = get_val_transforms(config)
    return host_normalise(config)(np.stack([transform(load_rgb_image(str(path))) for path in paths]))


def write_list(path: Path, lines) -> str:
    """A list file of ``lines``, each ended by a newline."""
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


def save_rgb(path: Path, value: int) -> Path:
    """A 4x3 RGB image of one colour (``value`` and the next two), its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (4, 3), (value, value + 1, value + 2)).save(path)
    return path


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def truncated(path: Path) -> Path:
    """``path`` cut to half its size, like a download that stopped."""
    return write_file(path, path.read_bytes()[: path.stat().st_size // 2])


def existing_output(folder: Path) -> Path:
    """An output file that an earlier run left in ``folder``: a failed run must leave it as it is."""
    return write_file(folder / 'out.pdparams', b'previous result')


def assert_output_untouched(output: Path) -> None:
    """``existing_output`` unchanged, and no other (temporary) output next to it."""
    assert output.read_bytes() == b'previous result'
    assert sorted(p.name for p in output.parent.iterdir() if p.name.startswith(output.name)) == [output.name]


def assert_reads_as_paddle_load(path: Path) -> None:
    """safe_pickle.load returns what paddle.load returns for ``path``, as tensors and as numpy arrays: the same
    structure, types, dtypes, values and tensor names."""
    for return_numpy in (False, True):
        _assert_same(safe_pickle.load(str(path), return_numpy=return_numpy),
                     paddle.load(str(path), return_numpy=return_numpy), str(path))


def _assert_same(actual, expected, where: str) -> None:
    assert type(actual) is type(expected), f'{where}: {type(actual)} != {type(expected)}'
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f'{where}[{key!r}]')
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected)):
            _assert_same(left, right, f'{where}[{index}]')
    elif isinstance(expected, paddle.Tensor):
        assert actual.dtype == expected.dtype, where
        assert _saved_name(actual) == _saved_name(expected), where
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=where)
    elif type(expected).__name__ == 'GeneratorState':  # paddle.get_rng_state()'s, which has no __eq__
        assert actual.__getstate__() == expected.__getstate__(), where
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype, where
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        assert actual == expected, where


def _saved_name(tensor) -> str | None:
    """A tensor's name from the file; one rebuilt from a bare array gets a fresh generated name on each read."""
    return None if tensor.name.startswith('generated_tensor') else tensor.name
