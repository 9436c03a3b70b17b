"""Shared test set-up: import path, all cores for Paddle, offline timm, real photos."""
import os
import sys
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))  # Paddle uses one core unless told
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # timm must never reach for a hub

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTO_DIR = Path(os.environ.get('BEIT_TEST_PHOTOS', ROOT / 'tests' / 'photos'))


@pytest.fixture(scope='session')
def photo_paths():
    """The real photos fetched by tests/fetch_photos.sh (run_tests.sh does it)."""
    paths = sorted(PHOTO_DIR.glob('*.jpg'))
    if len(paths) < 7:
        pytest.fail(f'real test photos missing in {PHOTO_DIR}: run bash tests/fetch_photos.sh')
    return paths


@pytest.fixture(scope='session')
def photos(photo_paths):
    return [Image.open(path).convert('RGB') for path in photo_paths]


@pytest.fixture(scope='session')
def small_photos(photos):
    """The real photos at most 96 px wide, so that thousands of op calls stay fast."""
    small = []
    for photo in photos:
        copy = photo.copy()
        copy.thumbnail((96, 96), Image.Resampling.BICUBIC)
        small.append(copy)
    return small


@pytest.fixture()
def used_output(tmp_path):
    """An output folder holding an earlier run's files, which no refused run may touch."""
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / 'log.txt').write_text('earlier log\n')
    (folder / 'metrics.jsonl').write_text('{"split": "val", "epoch": 1}\n')
    (folder / 'param_groups.json').write_text('{}')
    (folder / 'checkpoint-epoch-2.pdparams').write_bytes(b'earlier checkpoint')
    return folder


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
    import paddle

    import safe_pickle
    for return_numpy in (False, True):
        _assert_same(safe_pickle.load(str(path), return_numpy=return_numpy),
                     paddle.load(str(path), return_numpy=return_numpy), str(path))


def _assert_same(actual, expected, where: str) -> None:
    import numpy as np
    import paddle
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
