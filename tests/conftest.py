"""Shared test set-up: all cores for Paddle, offline timm; the fixtures many files use (real photos, a used
output folder). Shared functions and constants live in helpers.py (pytest.ini puts tests/ and the root on the path)."""
import os

os.environ.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))  # Paddle uses one core unless told
os.environ.setdefault('HF_HUB_OFFLINE', '1')  # timm must never reach for a hub

import pytest
from PIL import Image

from helpers import PHOTO_DIR


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
