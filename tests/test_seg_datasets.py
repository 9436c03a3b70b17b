"""seg_datasets.py: the two layouts (ADE20K folders, pair lists), the checks before training (missing files, size
mismatch, label values, annotation modes) with the file and line named, reduce_zero_label, the value check at load
time, and samples that depend on (seed, index) only, whatever the loader's worker count."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
import seg_datasets as sd
from config import ConfigError, get_default_config, merge_opts
from helpers import write_list
from sample_sources import DatasetError
from sample_table import lists_checked_once


def save_pair(root: Path, image: str, annotation: str, size=(12, 8), values=(0, 1, 2, 255), mode='L') -> None:
    """An RGB image and a label image of ``size`` (w, h) whose pixels cycle through ``values``."""
    width, height = size
    for path in (root / image, root / annotation):
        path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    Image.fromarray(np.stack([x * 20, y * 30, x + y], axis=-1).astype(np.uint8)).save(root / image)
    labels = np.array(values, dtype=np.int64)[(x + y * width) % len(values)]
    if mode == 'I;16':
        Image.fromarray(labels.astype(np.uint16)).save(root / annotation)
    else:
        Image.fromarray(labels.astype(np.uint8)).convert(mode).save(root / annotation)


def seg_config(root: Path, *opts, dataset='list', reduce=False, **data):
    config = get_default_config()
    merge_opts(config, ['DATA.DATA_PATH', str(root), 'SEG.DATASET', dataset, 'SEG.REDUCE_ZERO_LABEL', str(reduce),
                        'DATA.IMAGE_SIZE', '16', 'SEG.IMG_SCALE', '[64, 16]', 'DATA.NUM_WORKERS', '0', *opts])
    for key, value in data.items():
        config.DATA[key] = value
    return config


# ---- list layout ---------------------------------------------------------------------------------------------------

def test_list_pairs_by_whitespace_or_by_tab_when_paths_hold_spaces(tmp_path):
    save_pair(tmp_path, 'img/a.png', 'ann/a.png')
    save_pair(tmp_path, 'img/b c.png', 'ann/b c.png')
    absolute = tmp_path / 'elsewhere'
    save_pair(absolute, 'd.png', 'd_label.png')
    write_list(tmp_path / 'train_list.txt', ['# comment', 'img/a.png   ann/a.png', '', 'img/b c.png\t\tann/b c.png',
                                             f'{absolute / "d.png"} {absolute / "d_label.png"}'])
    pairs, source = sd.checked_pairs(seg_config(tmp_path), 'train')
    assert source == str(tmp_path / 'train_list.txt')
    assert list(pairs) == [
        sd.SegSample(str(tmp_path / 'img/a.png'), str(tmp_path / 'ann/a.png'), 2),
        sd.SegSample(str(tmp_path / 'img/b c.png'), str(tmp_path / 'ann/b c.png'), 4),
        sd.SegSample(str(absolute / 'd.png'), str(absolute / 'd_label.png'), 5)]


def test_the_processes_of_a_run_share_the_first_ones_checked_pairs(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png')
    write_list(tmp_path / 'train_list.txt', ['a.png a_label.png'])
    config = seg_config(tmp_path)
    with lists_checked_once(str(tmp_path / 'tables')):
        first, _ = sd.checked_pairs(config, 'train')
        (tmp_path / 'a_label.png').unlink()  # another process would fail its own check now
        shared, _ = sd.checked_pairs(config, 'train')
    assert list(shared) == list(first) == [sd.SegSample(str(tmp_path / 'a.png'), str(tmp_path / 'a_label.png'), 1)]
    assert isinstance(shared.table.labels, np.memmap)  # mapped from the saved table, not checked again


def test_list_problems_are_reported_together_with_their_lines(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png')
    save_pair(tmp_path, 'b.png', 'b_label.png', size=(12, 9))
    save_pair(tmp_path, 'c.png', 'c_label.png', values=(0, 151, 3, 200))
    (tmp_path / 'b_label.png').unlink()
    save_pair(tmp_path / 'small', 'b.png', 'b_label.png', size=(11, 9))
    list_path = write_list(tmp_path / 'val_list.txt', [
        'a.png a_label.png',              # 1: fine
        'a.png missing.png',              # 2: no annotation
        'b.png small/b_label.png',        # 3: 11x9 against 12x9
        'c.png c_label.png',              # 4: 151 and 200 with 150 classes
        'a b.png a_label.png',            # 5: three fields, no tab
        'gone.png a_label.png',           # 6: no image
    ])
    with pytest.raises(DatasetError) as info:
        sd.checked_pairs(seg_config(tmp_path), 'val')
    assert str(info.value) == (
        f'{list_path}: 5 of 6 pairs are unusable; the first 5:\n'
        f'  line 2: annotation file not found: {tmp_path / "missing.png"}\n'
        f'  line 3: {tmp_path / "small/b_label.png"} is 11x9 but its image {tmp_path / "b.png"} is 12x9 (width x '
        'height)\n'
        f'  line 4: {tmp_path / "c_label.png"}: label values 151, 200 found; values must lie in [0, 150) '
        '(SEG.NUM_CLASSES) or be SEG.IGNORE_INDEX 255\n'
        '  line 5: expected "image_path label_path" (a tab between them when a path holds spaces), got '
        "'a b.png a_label.png'\n"
        f'  line 6: file not found: {tmp_path / "gone.png"}')


def test_reduce_zero_label_allows_raw_values_up_to_num_classes_and_255(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png', values=(0, 1, 150, 255))
    save_pair(tmp_path, 'b.png', 'b_label.png', values=(0, 151))
    write_list(tmp_path / 'train_list.txt', ['a.png a_label.png'])
    assert len(sd.checked_pairs(seg_config(tmp_path, reduce=True), 'train')[0]) == 1
    with pytest.raises(DatasetError, match='line 1: .*a_label.png: label values 150 found'):
        sd.checked_pairs(seg_config(tmp_path, reduce=False), 'train')
    write_list(tmp_path / 'train_list.txt', ['b.png b_label.png'])
    with pytest.raises(DatasetError, match=r'label values 151 found; raw values must be 0..150 or 255'):
        sd.checked_pairs(seg_config(tmp_path, reduce=True), 'train')


def test_reduce_zero_label_maps_as_mmseg():
    raw = np.arange(256, dtype=np.uint8)
    expected = np.array([255, *range(254), 255], dtype=np.uint8)  # 0 -> 255, v -> v - 1, 255 stays
    np.testing.assert_array_equal(sd.LabelRule(150, 255, True).labels(raw), expected)
    np.testing.assert_array_equal(sd.LabelRule(150, 255, False).labels(raw), raw)


def test_colour_annotations_are_refused_and_16_bit_values_checked(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png', mode='RGB')
    save_pair(tmp_path, 'b.png', 'b_label.png', values=(1, 300), mode='I;16')
    write_list(tmp_path / 'train_list.txt', ['a.png a_label.png', 'b.png b_label.png'])
    with pytest.raises(DatasetError) as info:
        sd.checked_pairs(seg_config(tmp_path), 'train')
    assert 'line 1: ' + str(tmp_path / 'a_label.png') + ': an annotation must be a single-channel' in str(info.value)
    assert 'line 2: ' + str(tmp_path / 'b_label.png') + ': label values 300 found' in str(info.value)


def test_values_are_checked_at_load_time_when_the_list_check_skips_them(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png', values=(0, 151))
    write_list(tmp_path / 'val_list.txt', ['a.png a_label.png'])
    config = seg_config(tmp_path, 'SEG.CHECK_LABEL_VALUES', 'False')
    dataset = sd.get_seg_dataset(config, 'val')
    with pytest.raises(DatasetError) as info:
        dataset[0]
    assert str(info.value) == (f'{tmp_path / "a_label.png"} ({tmp_path / "val_list.txt"} line 1): label values 151 '
                               f'found; values must lie in [0, 150) (SEG.NUM_CLASSES) or be SEG.IGNORE_INDEX 255')
    loader = datasets.get_dataloader(config, dataset, 'val')
    with pytest.raises(DatasetError, match='label values 151'):
        list(loader)


def test_load_names_an_undecodable_file_and_its_line(tmp_path):
    save_pair(tmp_path, 'a.png', 'a_label.png')
    write_list(tmp_path / 'val_list.txt', ['a.png a_label.png'])
    dataset = sd.get_seg_dataset(seg_config(tmp_path), 'val')
    (tmp_path / 'a.png').write_bytes((tmp_path / 'a.png').read_bytes()[:40])
    with pytest.raises(DatasetError, match=f'cannot decode {tmp_path / "a.png"} .*line 1'):
        dataset[0]


# ---- ADE20K layout -------------------------------------------------------------------------------------------------

def test_ade20k_pairs_match_by_stem_under_images_and_annotations(tmp_path):
    for name in ('ADE_2.jpg', 'ADE_1.jpg', 'sub/ADE_3.jpg'):
        save_pair(tmp_path, f'images/training/{name}', f'annotations/training/{name[:-4]}.png')
    save_pair(tmp_path, 'images/validation/x.jpg', 'annotations/training/unused.png')  # an annotation alone: unused
    (tmp_path / 'images/training/notes.txt').write_text('not an image')
    pairs, source = sd.checked_pairs(seg_config(tmp_path, dataset='ade20k', reduce=True), 'train')
    assert source == str(tmp_path / 'images/training')
    assert [(Path(p.image).relative_to(tmp_path).as_posix(), Path(p.annotation).relative_to(tmp_path).as_posix(),
             p.line) for p in pairs] == [
        ('images/training/ADE_1.jpg', 'annotations/training/ADE_1.png', 0),
        ('images/training/ADE_2.jpg', 'annotations/training/ADE_2.png', 0),
        ('images/training/sub/ADE_3.jpg', 'annotations/training/sub/ADE_3.png', 0)]


def test_ade20k_missing_annotation_and_folder_are_named(tmp_path):
    save_pair(tmp_path, 'images/validation/a.jpg', 'annotations/validation/a.png')
    save_pair(tmp_path, 'images/validation/b.jpg', 'annotations/validation/b.png')
    (tmp_path / 'annotations/validation/b.png').unlink()
    config = seg_config(tmp_path, dataset='ade20k', reduce=True)
    with pytest.raises(DatasetError) as info:
        sd.checked_pairs(config, 'val')
    assert str(info.value) == (f'{tmp_path / "images/validation"}: 1 of 2 pairs are unusable; the first 1:\n'
                               f'  annotation file not found: {tmp_path / "annotations/validation/b.png"}')
    with pytest.raises(DatasetError, match='ADE20K image folder not found: .*images/training'):
        sd.checked_pairs(config, 'train')


# ---- samples and seeds ---------------------------------------------------------------------------------------------

def _train_set(tmp_path: Path, count: int = 6):
    for i in range(count):
        save_pair(tmp_path, f'images/training/{i}.jpg', f'annotations/training/{i}.png', size=(20 + i, 14),
                  values=(0, 1, 2, 3, 1, 2, 150))
    config = seg_config(tmp_path, dataset='ade20k', reduce=True, BATCH_SIZE_EVAL=2)
    return config, sd.get_seg_dataset(config, 'train')


def test_train_samples_are_crop_sized_float_images_and_int64_labels(tmp_path):
    _, dataset = _train_set(tmp_path, 1)
    dataset.reseed(3)
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    assert label.shape == (16, 16) and label.dtype == np.int64
    assert set(np.unique(label)) <= {0, 1, 2, 149, 255}  # reduce_zero_label: 0 -> 255, v -> v - 1


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_sample_depends_on_seed_and_index_only_whatever_the_worker_count(tmp_path, num_workers):
    config, dataset = _train_set(tmp_path)
    dataset.reseed(11)
    reference = [dataset[i] for i in range(len(dataset))]
    dataset.reseed(11)
    config.DATA.NUM_WORKERS = num_workers
    loader = datasets.get_dataloader(config, dataset, 'val')  # in order; the train transform draws
    batches = list(loader)
    images = np.concatenate([np.asarray(batch[0]) for batch in batches])
    labels = np.concatenate([np.asarray(batch[1]) for batch in batches])
    np.testing.assert_array_equal(images, np.stack([image for image, _ in reference]))
    np.testing.assert_array_equal(labels, np.stack([label for _, label in reference]))
    dataset.reseed(12)
    assert any(not np.array_equal(dataset[i][0], reference[i][0]) for i in range(len(dataset)))


def test_val_samples_keep_the_original_label_size(tmp_path):
    save_pair(tmp_path, 'images/validation/a.jpg', 'annotations/validation/a.png', size=(20, 10), values=(0, 5))
    image, label = sd.get_seg_dataset(seg_config(tmp_path, dataset='ade20k', reduce=True), 'val')[0]
    assert image.shape == (3, 16, 32) and label.shape == (10, 20)  # (64, 16): factor min(64/20, 16/10) = 1.6
    assert set(np.unique(label)) == {255, 4}


# ---- config --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(('opts', 'message'), [
    (['SEG.DATASET', 'ade'], "SEG.DATASET must be one of ['ade20k', 'list'], got 'ade'"),
    (['SEG.IGNORE_INDEX', '254', 'SEG.REDUCE_ZERO_LABEL', 'True'], 'SEG.IGNORE_INDEX must be 255'),
    (['SEG.IGNORE_INDEX', '100'], 'SEG.IGNORE_INDEX 100 must lie in [SEG.NUM_CLASSES, 255]'),
    (['SEG.RATIO_RANGE', '[2.0, 0.5]'], 'SEG.RATIO_RANGE needs [min, max] with 0 < min <= max'),
    (['SEG.CAT_MAX_RATIO', '0.0'], 'SEG.CAT_MAX_RATIO must lie in (0, 1]'),
    (['SEG.IMG_SCALE', '[640]'], 'SEG.IMG_SCALE needs two positive integers'),
])
def test_bad_seg_data_keys_are_refused_naming_key_and_origin(tmp_path, opts, message):
    config = get_default_config()
    merge_opts(config, opts)
    with pytest.raises(ConfigError) as info:
        sd.validate_seg_data_config(config)
    assert '-opts: ' in str(info.value) and message in str(info.value)  # where the value came from
