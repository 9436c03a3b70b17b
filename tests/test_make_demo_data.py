"""The embedded Fashion-MNIST demo set: the committed files validate, and the script that made them is exact."""
import gzip
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT
from make_demo_data import CLASS_NAMES, DEFAULT_SOURCE, SourceError, main, read_idx_ubyte
from sample_sources import scan_image_folder, validate_list_file

DEMO = ROOT / 'data' / 'fashion_mnist'
NUM_CLASSES = len(CLASS_NAMES)
EXPECTED_PER_CLASS = {'train': 500, 'val': 100}
MAX_SET_BYTES = 5 * 2 ** 20


def write_idx_ubyte(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: zero bytes, type 0x08 (unsigned byte), the rank, big-endian dimensions, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype='>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_source(folder: Path, train_per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> dict:
    """Random 28x28 images with shuffled labels in both splits; returns {prefix: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    splits = {}
    for prefix, per_class in (('train', train_per_class), ('t10k', test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), per_class)).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx_ubyte(folder / f'{prefix}-images-idx3-ubyte.gz', images)
        write_idx_ubyte(folder / f'{prefix}-labels-idx1-ubyte.gz', labels)
        splits[prefix] = (images, labels)
    return splits


def file_hashes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob('*')) if path.is_file()}


def listed_samples(folder: Path, split: str) -> list:
    return validate_list_file(str(folder / f'{split}_list.txt'), str(folder), NUM_CLASSES)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_committed_set_is_a_balanced_list_file_set(split):
    samples = listed_samples(DEMO, split)
    assert Counter(sample.label for sample in samples) == dict.fromkeys(range(NUM_CLASSES), EXPECTED_PER_CLASS[split])
    listed = {os.path.relpath(sample.path, DEMO) for sample in samples}
    on_disk = {str(path.relative_to(DEMO)) for path in (DEMO / split).rglob('*') if path.is_file()}
    assert listed == on_disk and len(listed) == len(samples)
    for sample in samples[::97]:
        with Image.open(sample.path) as img:
            assert (img.format, img.mode, img.size) == ('PNG', 'L', (28, 28))
        assert Path(sample.path).parent.name.startswith(f'{sample.label}_')


def test_committed_set_has_names_licence_and_stays_small():
    assert (DEMO / 'classes.txt').read_text(encoding='utf-8').splitlines() == list(CLASS_NAMES)
    assert 'Zalando SE' in (DEMO / 'LICENSE').read_text(encoding='utf-8')
    readme = (DEMO / 'README.md').read_text(encoding='utf-8')
    assert 'arXiv:1708.07747' in readme and 'make_demo_data.py' in readme
    assert sum(path.stat().st_size for path in DEMO.rglob('*') if path.is_file()) < MAX_SET_BYTES


def test_committed_set_reads_as_an_image_folder_with_the_same_labels():
    by_folder = {os.path.relpath(s.path, DEMO): s.label for s in scan_image_folder(str(DEMO / 'val'), NUM_CLASSES)}
    by_list = {os.path.relpath(s.path, DEMO): s.label for s in listed_samples(DEMO, 'val')}
    assert by_folder == by_list


@pytest.mark.skipif(not os.path.isdir(DEFAULT_SOURCE), reason=f'{DEFAULT_SOURCE} missing: '
                    'apt-get install dataset-fashion-mnist to check the committed set against a rebuild')
def test_committed_set_is_what_the_script_builds(tmp_path):
    assert main(['-output', str(tmp_path / 'rebuilt')]) == 0
    assert file_hashes(tmp_path / 'rebuilt') == file_hashes(DEMO)


def test_synthetic_source_round_trips_labels_and_pixels(tmp_path):
    source = synthetic_source(tmp_path / 'source')
    out = tmp_path / 'out'
    assert main(['-source', str(tmp_path / 'source'), '-output', str(out), '-train_per_class', '2',
                 '-val_per_class', '1', '-seed', '3']) == 0
    for split, prefix, per_class in (('train', 'train', 2), ('val', 't10k', 1)):
        images, labels = source[prefix]
        samples = listed_samples(out, split)
        assert Counter(sample.label for sample in samples) == dict.fromkeys(range(NUM_CLASSES), per_class)
        for sample in samples:
            name = Path(sample.path).stem
            assert name.startswith(f'{prefix}_')
            index = int(name.split('_')[1])
            assert sample.label == labels[index]
            with Image.open(sample.path) as img:
                assert img.mode == 'L'
                np.testing.assert_array_equal(np.asarray(img), images[index])
    assert (out / 'classes.txt').read_text().splitlines() == list(CLASS_NAMES)


def test_rerun_is_byte_identical_and_the_seed_matters(tmp_path):
    synthetic_source(tmp_path / 'source')
    args = ['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'out'), '-train_per_class', '2',
            '-val_per_class', '1']
    assert main(args) == 0
    first = file_hashes(tmp_path / 'out')
    assert main(args) == 0
    assert file_hashes(tmp_path / 'out') == first
    assert main([*args, '-seed', '1']) == 0
    assert set(file_hashes(tmp_path / 'out')) != set(first)  # other images chosen


def test_too_few_images_is_an_error_naming_the_class(tmp_path, capsys):
    synthetic_source(tmp_path / 'source')
    assert main(['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'out'),
                 '-train_per_class', '4']) == 2
    assert 'class 0 (T-shirt/top) has 3 images, 4 requested' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_missing_or_malformed_source_is_a_clear_error(tmp_path, capsys):
    assert main(['-source', str(tmp_path / 'nothing'), '-output', str(tmp_path / 'out')]) == 2
    assert 'dataset-fashion-mnist' in capsys.readouterr().err
    synthetic_source(tmp_path / 'source')
    (tmp_path / 'source' / 'train-labels-idx1-ubyte.gz').write_bytes(gzip.compress(b'\x00\x00\x0d\x01'))
    assert main(['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'out')]) == 2
    assert 'bad magic number' in capsys.readouterr().err
    write_idx_ubyte(tmp_path / 'short.gz', np.zeros((2, 3), np.uint8))
    (tmp_path / 'short.gz').write_bytes(gzip.compress(gzip.decompress((tmp_path / 'short.gz').read_bytes())[:-1]))
    with pytest.raises(SourceError, match='do not match the declared shape'):
        read_idx_ubyte(str(tmp_path / 'short.gz'))


def test_a_folder_not_made_by_the_script_is_left_alone(tmp_path, capsys):
    synthetic_source(tmp_path / 'source')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    assert main(['-source', str(tmp_path / 'source'), '-output', str(tmp_path / 'mine'),
                 '-train_per_class', '1', '-val_per_class', '1']) == 2
    assert 'was not made by this script' in capsys.readouterr().err
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'
