"""datasets.py: a config's split read from its list file or class folders, RGB decoding, the bad-image policy, the
samplers and the loaders (with and without worker processes) on tiny images written in a temporary folder."""
import logging
import random
import threading
import types
from functools import partial
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

import datasets
import transforms
from config import DATASETS, get_config
from datasets import LabeledImageDataset, ShardedEvalBatchSampler
from helpers import save_rgb, write_list
from image_files import load_rgb_image
from sample_sources import DatasetError, validate_list_file
from sample_table import Sample
from utils import derived_seed

TINY = (12, 10)  # width, height of the JPEGs written from the real photos


def to_chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1)


def resized_chw(img: Image.Image, size: int, halve: bool) -> np.ndarray:
    """uint8 CHW, as the real transforms give; halved, every value is below 128 (negative once normalised)."""
    pixels = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)
    return pixels // 2 if halve else np.ascontiguousarray(pixels)


@pytest.fixture
def stub_transforms(monkeypatch):
    """Stand-in transforms: val resizes, train does the same and halves, so tests see which was used."""
    train = lambda config: partial(resized_chw, size=config.DATA.IMAGE_SIZE, halve=True)  # noqa: E731
    val = lambda config: partial(resized_chw, size=config.DATA.IMAGE_SIZE, halve=False)  # noqa: E731
    monkeypatch.setattr(datasets, 'get_train_transforms', train)
    monkeypatch.setattr(datasets, 'get_val_transforms', val)
    return types.SimpleNamespace(get_train_transforms=train, get_val_transforms=val)


def make_config(root, **data):
    config = get_config()
    config.DATA.DATA_PATH = str(root)
    config.DATA.IMAGE_SIZE = 8
    config.DATA.NUM_WORKERS = 0
    config.MODEL.NUM_CLASSES = 3
    for key, value in data.items():
        config.DATA[key] = value
    return config


def read_all(loader, seconds: float = 60.0) -> list:
    """All batches of ``loader``. Without workers a Paddle loader can leave its caller waiting forever, so they
    are read on a daemon thread and a hang fails the test (not CI); workers must be started on the main thread."""
    if loader.num_workers:
        return list(loader)
    outcome = {}

    def read():
        try:
            outcome['batches'] = list(loader)
        except Exception as err:
            outcome['error'] = err

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    if reader.is_alive():
        pytest.fail(f'the loader still hangs after {seconds} s')
    if 'error' in outcome:
        raise outcome['error']
    return outcome['batches']


@pytest.fixture(scope='module')
def tiny_jpegs(photo_paths, tmp_path_factory):
    """The real photos as small JPEGs, in folders whose names hold spaces."""
    folder = tmp_path_factory.mktemp('jpegs')
    paths = []
    for index, photo in enumerate(photo_paths):
        path = folder / f'class {index % 3}' / f'{photo.stem} photo.JPEG'
        path.parent.mkdir(exist_ok=True)
        with Image.open(photo) as img:
            img.convert('RGB').resize(TINY, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return folder, paths


# ---- a config's split: the data folder, its list file or class folders ------------------------------------------

def test_missing_data_path_or_list_file_is_named(tmp_path, stub_transforms):
    with pytest.raises(DatasetError) as info:
        datasets.get_dataset(make_config(tmp_path / 'nowhere'), 'train')
    assert str(info.value) == f'DATA.DATA_PATH not found: {tmp_path / "nowhere"}'
    with pytest.raises(DatasetError) as info:
        datasets.get_dataset(make_config(''), 'train')
    assert str(info.value) == 'DATA.DATA_PATH is not set: give the folder that holds the data'
    with pytest.raises(DatasetError) as info:
        datasets.get_dataset(make_config(tmp_path), 'val')
    assert str(info.value) == f'list file not found: {tmp_path / "val_list.txt"}'


def test_unknown_dataset_and_mode_are_rejected(tmp_path, stub_transforms):
    with pytest.raises(DatasetError) as info:
        datasets.get_dataset(make_config(tmp_path, DATASET='cifar'), 'train')
    assert str(info.value) == "DATA.DATASET must be one of ['imagenet2012', 'imagefolder'], got 'cifar'"
    with pytest.raises(ValueError, match="mode must be one of \\['train', 'val'\\], got 'test'"):
        datasets.get_dataset(make_config(tmp_path), 'test')


@pytest.mark.parametrize('dataset', DATASETS)
def test_every_dataset_choice_of_the_config_is_read(tmp_path, stub_transforms, dataset):
    """config.DATASETS is the one list of DATA.DATASET choices: each must have its reader here."""
    images = [save_rgb(tmp_path / 'val' / f'class {label}' / 'x.png', label) for label in range(3)]
    write_list(tmp_path / 'val_list.txt', [f'val/class {label}/x.png {label}' for label in range(3)])
    samples = datasets.get_dataset(make_config(tmp_path, DATASET=dataset), 'val').samples
    assert [(sample.path, sample.label) for sample in samples] == [(str(image), label)
                                                                   for label, image in enumerate(images)]


def test_image_folder_classes_are_sorted_names(tmp_path, stub_transforms):
    for name in ('train/b cls/2.png', 'train/b cls/1.png', 'train/a cls/deep/0.PNG', 'train/c cls/x.jpeg',
                 'train/.cache/9.png'):
        save_rgb(tmp_path / name, 0)
    (tmp_path / 'train/a cls/readme.txt').write_text('not an image')
    dataset = datasets.get_dataset(make_config(tmp_path, DATASET='imagefolder'), 'train')
    train = tmp_path / 'train'
    assert list(dataset.samples) == [Sample(str(train / 'a cls/deep/0.PNG'), 0), Sample(str(train / 'b cls/1.png'), 1),
                               Sample(str(train / 'b cls/2.png'), 1), Sample(str(train / 'c cls/x.jpeg'), 2)]
    assert dataset.source == str(train)


# ---- decoding ---------------------------------------------------------------------------------------------------

def _cmyk_image() -> Image.Image:
    img = Image.new('CMYK', (4, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0), (10, 20, 30, 128)]):
        img.putpixel((x, 0), value)
    return img


def _palette_image() -> Image.Image:
    img = Image.new('P', (3, 1))
    img.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 759)
    img.putdata([2, 0, 1])
    img.info['transparency'] = 0
    return img


MODE_CASES = {  # file name, image, expected RGB rows
    'L': ('grey.png', Image.fromarray(np.array([[0, 128, 255]], np.uint8)),
          [[(0, 0, 0), (128, 128, 128), (255, 255, 255)]]),
    'P': ('palette.png', _palette_image(), [[(70, 80, 90), (10, 20, 30), (40, 50, 60)]]),
    'RGBA': ('alpha.png', Image.fromarray(np.array([[(10, 20, 30, 0), (200, 100, 50, 255)]], np.uint8)),
             [[(10, 20, 30), (200, 100, 50)]]),
    'CMYK': ('cmyk.tif', _cmyk_image(), [[(0, 255, 255), (0, 0, 0), (255, 255, 255), (122, 117, 112)]]),
    # 16-bit grey is scaled by 255/65535 and rounded; PIL's own convert would clip 257.. to 255
    'I;16': ('deep.png', Image.fromarray(np.array([[0, 257, 32768, 65535, 128, 1000]], np.uint16)),
             [[(v, v, v) for v in (0, 1, 128, 255, 0, 4)]]),
}


@pytest.mark.parametrize('mode', MODE_CASES)
def test_every_mode_becomes_rgb_with_the_right_values(tmp_path, mode):
    name, img, expected = MODE_CASES[mode]
    img.save(tmp_path / name)
    with Image.open(tmp_path / name) as reopened:
        assert reopened.mode == mode
    dataset = LabeledImageDataset([Sample(str(tmp_path / name), 1, 1)], to_chw)
    image, label = dataset[0]
    assert image.dtype == np.float32 and label.dtype == np.int64 and label == 1
    np.testing.assert_array_equal(image, np.array(expected, np.float32).transpose(2, 0, 1))


# ---- bad images at run time -------------------------------------------------------------------------------------

def _write_bad_files(folder: Path, good_jpeg: Path) -> dict:
    data = good_jpeg.read_bytes()
    files = {'truncated': folder / 'truncated.JPEG', 'empty': folder / 'empty.JPEG', 'text': folder / 'notes.JPEG'}
    files['truncated'].write_bytes(data[:-10])  # decodes 'fine' with ImageFile.LOAD_TRUNCATED_IMAGES
    files['empty'].write_bytes(b'')
    files['text'].write_text('this is not a picture\n')
    return files


BAD_KINDS = {'truncated': 'image file is truncated', 'empty': 'cannot identify image file',
             'text': 'cannot identify image file'}


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('kind', BAD_KINDS)
def test_policy_error_names_the_bad_file_and_its_line(tmp_path, tiny_jpegs, kind, num_workers):
    good = tiny_jpegs[1][0]
    bad = _write_bad_files(tmp_path, good)[kind]
    list_path = write_list(tmp_path / 'val_list.txt', [f'{good} 0', '# then the bad one', f'{bad.name} 1'])
    dataset = LabeledImageDataset(validate_list_file(list_path, str(tmp_path), 3), to_chw, 'error', list_path)
    loader = datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE_EVAL=1, NUM_WORKERS=num_workers), dataset, 'val')
    with pytest.raises(DatasetError) as info:
        read_all(loader)
    assert str(info.value).startswith(f'cannot decode image {bad} ({list_path} line 3): {BAD_KINDS[kind]}')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_policy_skip_serves_the_next_good_sample_and_counts_each_bad_file_once(tmp_path, tiny_jpegs, num_workers,
                                                                               caplog):
    jpegs = tiny_jpegs[1]
    bad = _write_bad_files(tmp_path, jpegs[0])
    order = [jpegs[0], bad['truncated'], jpegs[1], bad['empty'], bad['text'], jpegs[2]]
    list_path = write_list(tmp_path / 'val_list.txt', [f'{path} {index % 3}' for index, path in enumerate(order)])
    dataset = LabeledImageDataset(validate_list_file(list_path, str(tmp_path), 3), to_chw, 'skip', list_path)
    loader = datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE_EVAL=4, NUM_WORKERS=num_workers), dataset, 'val')
    with caplog.at_level(logging.WARNING, logger='datasets'):
        for _ in range(2):
            images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in loader])
            images, labels = np.concatenate(images), np.concatenate(labels)
            assert labels.tolist() == [0, 2, 2, 2, 2, 2]  # 1 -> 2, 3 and 4 -> 5 (label 5 % 3)
            with Image.open(jpegs[2]) as replacement:
                np.testing.assert_array_equal(images[3], to_chw(replacement.convert('RGB')))
    assert dataset.bad_images == 3
    assert dataset.bad_image_paths() == [str(bad['truncated']), str(bad['empty']), str(bad['text'])]
    if num_workers == 0:  # worker processes log to their own stderr
        assert [r.getMessage().split(': ')[0] for r in caplog.records] == [
            f'skipping undecodable image {bad[kind]} ({list_path} line {line})'
            for kind, line in (('truncated', 2), ('empty', 4), ('text', 5))]


def test_policy_skip_with_no_good_image_is_an_error(tmp_path):
    (tmp_path / 'a.JPEG').write_bytes(b'')
    dataset = LabeledImageDataset([Sample(str(tmp_path / 'a.JPEG'), 0, 1)] * 2, to_chw, 'skip', 'list.txt')
    with pytest.raises(DatasetError) as info:
        dataset[1]
    assert str(info.value) == 'list.txt: none of the 2 images decodes'
    assert dataset.bad_images == 2  # two entries of the same file


def test_a_dataset_needs_samples():
    with pytest.raises(DatasetError) as info:
        LabeledImageDataset([], to_chw, source='val_list.txt')
    assert str(info.value) == 'val_list.txt: no samples'


def test_an_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="bad_image_policy must be one of \\['error', 'skip'\\], got 'ignore'"):
        LabeledImageDataset([Sample('x.png', 0)], to_chw, 'ignore')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_failing_transform_raises_in_the_caller_instead_of_hanging(tmp_path, num_workers):
    def broken(img):
        raise TypeError('the transform is broken')

    dataset = LabeledImageDataset([Sample(str(save_rgb(tmp_path / 'a.png', 0)), 0)], broken)
    loader = datasets.get_dataloader(make_config(tmp_path, NUM_WORKERS=num_workers), dataset, 'val')
    with pytest.raises(RuntimeError) as info:
        read_all(loader)
    assert str(info.value).startswith('loading sample 0 failed:\nTraceback')
    assert str(info.value).endswith('TypeError: the transform is broken\n')


# ---- samplers and loaders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('world_size', [1, 2, 3, 4])
@pytest.mark.parametrize('num_samples', [0, 1, 2, 5, 7, 13, 50, 101])
def test_eval_shards_cover_every_index_once_without_padding(world_size, num_samples):
    batch_size = 4
    shards = []
    for rank in range(world_size):
        sampler = ShardedEvalBatchSampler(num_samples, batch_size, rank, world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert all(len(batch) == batch_size for batch in batches[:-1])
        shards.append([index for batch in batches for index in batch])
    assert sorted(index for shard in shards for index in shard) == list(range(num_samples))
    assert [index for shard in shards for index in shard] == list(range(num_samples))  # contiguous, in order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_sampler_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match='0 <= rank < world_size'):
        ShardedEvalBatchSampler(10, 2, rank=2, world_size=2)


class IndexDataset(datasets.Dataset):
    """Sample i is (a 1x1x1 image holding i, label i)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return np.full((1, 1, 1), index, np.float32), np.int64(index)


def _epoch_labels(loader) -> list:
    return [label.numpy().tolist() for _, label in loader]


def test_train_loader_shuffles_drops_the_partial_batch_and_follows_set_epoch(tmp_path):
    loader = datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE=4), IndexDataset(10), 'train')
    loader.batch_sampler.set_epoch(0)
    first = _epoch_labels(loader)
    loader.batch_sampler.set_epoch(1)
    second = _epoch_labels(loader)
    loader.batch_sampler.set_epoch(0)
    assert _epoch_labels(loader) == first
    for batches in (first, second):
        assert [len(batch) for batch in batches] == [4, 4]
        assert len(set(first[0] + first[1])) == 8
    assert first != second and first[0] + first[1] != sorted(first[0] + first[1])


class CountingDraws:
    """Stands in for Mixup's BatchDraws: draw k (from 0) is (float32 [B] of k, int64 [B, 2] of the batch size)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch_size):
        self.calls += 1
        return np.full(batch_size, self.calls - 1, np.float32), np.full((batch_size, 2), batch_size, np.int64)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_train_batches_carry_the_draws_made_in_batch_order(tmp_path, num_workers):
    """Draws are made in this process as batches are fetched, so they follow the batch order for any worker count;
    set_epoch still reaches the sampler (same order as without draws)."""
    config = make_config(tmp_path, BATCH_SIZE=2, NUM_WORKERS=num_workers)
    draws = CountingDraws()
    loader = datasets.get_dataloader(config, IndexDataset(9), 'train', batch_draws=draws)
    plain = datasets.get_dataloader(config, IndexDataset(9), 'train')
    for epoch in (0, 3):
        loader.batch_sampler.set_epoch(epoch)
        plain.batch_sampler.set_epoch(epoch)
        draws.calls = 0
        batches = [[part.numpy() for part in batch] for batch in read_all(loader)]
        assert [labels.tolist() for _, labels, _, _ in batches] == _epoch_labels(plain)
        assert [order.tolist() for _, _, order, _ in batches] == [[0, 0], [1, 1], [2, 2], [3, 3]]
        assert all(sizes.dtype == np.int64 and sizes.shape == (2, 2) for *_, sizes in batches)
    assert len(loader) == 4


def test_draws_are_for_training_batches_only(tmp_path):
    with pytest.raises(ValueError, match='batch_draws are for training batches only'):
        datasets.get_dataloader(make_config(tmp_path), IndexDataset(4), 'val', batch_draws=CountingDraws())


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_failing_sample_still_raises_when_batches_carry_draws(tmp_path, num_workers):
    dataset = datasets.LabeledImageDataset([Sample(str(tmp_path / 'missing.jpg'), 0, 7)] * 4,
                                           transform=lambda img: img, source='train_list.txt')
    loader = datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE=2, NUM_WORKERS=num_workers), dataset,
                                     'train', batch_draws=CountingDraws())
    with pytest.raises(DatasetError, match=r'missing.jpg \(train_list.txt line 7\)'):
        read_all(loader)


def test_train_loader_without_a_full_batch_is_an_error(tmp_path):
    with pytest.raises(DatasetError) as info:
        datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE=4), IndexDataset(3), 'train')
    assert str(info.value) == ('the train set has 3 samples: no full batch of DATA.BATCH_SIZE 4 '
                               'for each of 1 process(es)')


def test_val_loader_keeps_order_and_the_last_partial_batch(tmp_path):
    loader = datasets.get_dataloader(make_config(tmp_path, BATCH_SIZE_EVAL=4), IndexDataset(10), 'val')
    batches = [(image.numpy(), label.numpy()) for image, label in loader]
    assert [label.tolist() for _, label in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert batches[0][0].shape == (4, 1, 1, 1) and batches[0][0].dtype == np.float32
    assert batches[0][1].dtype == np.int64


def test_multi_process_loaders_read_this_ranks_share(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.dist, 'get_rank', lambda: 1)
    monkeypatch.setattr(datasets.dist, 'get_world_size', lambda: 3)
    config = make_config(tmp_path, BATCH_SIZE=2, BATCH_SIZE_EVAL=2)
    assert _epoch_labels(datasets.get_dataloader(config, IndexDataset(10), 'val', multi_process=True)) == [
        [3, 4], [5]]
    train = datasets.get_dataloader(config, IndexDataset(10), 'train', multi_process=True)
    assert (train.batch_sampler.nranks, train.batch_sampler.local_rank) == (3, 1)
    assert [len(batch) for batch in _epoch_labels(train)] == [2, 2]  # 10 padded to 12: 4 per rank


# ---- the whole path: get_dataset, get_dataloader, real JPEGs -----------------------------------------------------

def test_real_transforms_flow_through_the_loaders(tiny_jpegs):
    folder, paths = tiny_jpegs
    lines = [f'{path.relative_to(folder)} {index % 3}' for index, path in enumerate(paths)]
    write_list(folder / 'val_list.txt', lines)
    write_list(folder / 'train_list.txt', lines)
    config = make_config(folder, BATCH_SIZE=2, BATCH_SIZE_EVAL=4, IMAGE_SIZE=16)
    assert datasets.get_val_transforms is transforms.get_val_transforms
    val_loader = datasets.get_dataloader(config, datasets.get_dataset(config, 'val'), 'val')
    val_images = np.concatenate([x.numpy() for x, _ in val_loader])
    expected = transforms.host_normalise(config)(
        np.stack([transforms.get_val_transforms(config)(load_rgb_image(str(p))) for p in paths]))
    np.testing.assert_array_equal(val_images, expected)
    train_loader = datasets.get_dataloader(config, datasets.get_dataset(config, 'train'), 'train')
    assert [tuple(x.shape) for x, _ in train_loader] == [(2, 3, 16, 16)] * 3


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _todays_to_chw_float(img: Image.Image) -> np.ndarray:
    """What the pipelines ended with before the workers sent uint8 (transforms.to_chw_float of before)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1)) / 255


def _todays_float_pipeline(pipeline, config):
    """The pipeline as it was before the workers sent uint8: its steps, then float32 / 255 and Normalize."""
    normalize = transforms.T.Normalize(mean=list(config.DATA.IMAGENET_MEAN), std=list(config.DATA.IMAGENET_STD))
    return transforms.T.Compose([*pipeline.transforms[:-1], _todays_to_chw_float, normalize])


def _epoch(loader, prepare: bool) -> list:
    """The batches of epoch 3 (a train sampler moves to the next epoch after each pass)."""
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(3)
    on_device = loader.on_device
    loader.on_device = on_device if prepare else None
    try:
        return [[field.numpy() for field in batch] for batch in read_all(loader)]
    finally:
        loader.on_device = on_device


def _read_raw_and_prepared(loader) -> tuple[list, list]:
    """The epoch's batches as the workers send them, then as the loader yields them (same epoch, same draws)."""
    return _epoch(loader, prepare=False), _epoch(loader, prepare=True)


def _epoch_indices(loader) -> list[int]:
    if hasattr(loader.batch_sampler, 'set_epoch'):
        loader.batch_sampler.set_epoch(3)
    return [index for batch in loader.batch_sampler for index in batch]


def _labelled_loader(tiny_jpegs, mode: str, num_workers: int, **train):
    folder, paths = tiny_jpegs
    lines = [f'{path.relative_to(folder)} {index % 3}' for index, path in enumerate(paths)]
    write_list(folder / 'val_list.txt', lines)
    write_list(folder / 'train_list.txt', lines)
    config = make_config(folder, BATCH_SIZE=2, BATCH_SIZE_EVAL=3, IMAGE_SIZE=16, NUM_WORKERS=num_workers,
                         IMAGENET_MEAN=IMAGENET_MEAN, IMAGENET_STD=IMAGENET_STD)
    config.TRAIN.update(train)
    dataset = datasets.get_dataset(config, mode)
    dataset.reseed(7)
    return config, dataset, datasets.get_dataloader(config, dataset, mode)


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('mode', ['train', 'val'])
def test_workers_send_uint8_and_the_batch_equals_todays_float_batch(tiny_jpegs, mode, num_workers):
    """Random erasing off (RandAugment on for train): the batch leaving the workers is uint8, and the loader's
    batch, normalised after the transfer, equals bit for bit what the float32 pipeline of before gave each sample
    with the same per-sample seeds; the host normalisation (prediction) gives the same values."""
    config, dataset, loader = _labelled_loader(tiny_jpegs, mode, num_workers, RANDOM_ERASE_PROB=0.0)
    assert config.TRAIN.RAND_AUGMENT and dataset.erasing is None
    raw, prepared = _read_raw_and_prepared(loader)
    assert all(len(batch) == 2 and batch[0].dtype == np.uint8 and batch[1].dtype == np.int64 for batch in raw)
    images = np.concatenate([batch[0] for batch in prepared])
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, transforms.host_normalise(config)(np.concatenate([b[0] for b in raw])))
    todays = _todays_float_pipeline(dataset.transform, config)
    expected = []
    for index in _epoch_indices(loader):
        dataset._seed_draws(index)
        expected.append(todays(dataset._first_decodable(index)[0]))
    np.testing.assert_array_equal(images, np.stack(expected))
    assert [b[1].tolist() for b in prepared] == [b[1].tolist() for b in raw]


def test_erasing_boxes_travel_with_the_batch_and_do_not_depend_on_the_workers(tiny_jpegs):
    """Random erasing on: each sample ships its boxes (int64 [count, 5], drawn in the worker from the sample's
    seed), the device erases exactly those boxes of the normalised images, and the batches are the same with
    0 and 2 workers."""
    settings = {'RANDOM_ERASE_PROB': 1.0, 'RANDOM_ERASE_COUNT': 2, 'RANDOM_ERASE_MODE': 'pixel'}
    results = []
    for num_workers in (0, 2):
        config, dataset, loader = _labelled_loader(tiny_jpegs, 'train', num_workers, **settings)
        results.append(_read_raw_and_prepared(loader))
    (raw, prepared), (raw_workers, prepared_workers) = results
    for ours, theirs in zip(raw + prepared, raw_workers + prepared_workers):
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    for (images, labels, boxes), (erased, erased_labels) in zip(raw, prepared):
        assert boxes.dtype == np.int64 and boxes.shape == (2, 2, 5) and (boxes[:, 0, 2] > 0).all()
        clean = transforms.host_normalise(config)(images)
        inside = np.zeros((len(images), 16, 16), dtype=bool)
        for index, rows in enumerate(boxes):
            for top, left, height, width, _ in rows:
                inside[index, top:top + height, left:left + width] = True
        assert np.array_equal((erased != clean).any(axis=1), inside) and np.array_equal(labels, erased_labels)
        np.testing.assert_array_equal(erased, dataset.erasing.apply(paddle.to_tensor(clean),
                                                                    paddle.to_tensor(boxes)).numpy())


def _fake_statvfs(size_mib: int, free_mib: int):
    block = 4096
    return lambda path: types.SimpleNamespace(f_frsize=block, f_blocks=size_mib * 2 ** 20 // block,
                                              f_bavail=free_mib * 2 ** 20 // block)


def test_shared_memory_too_small_for_the_batches_is_a_clear_error(tiny_jpegs, monkeypatch):
    """Docker's default 64 MB /dev/shm: a batch of 256 at 224 px weighs 36.8 MiB in uint8 (147 MiB in float32 of
    before); 2 workers keep 4 in flight. The error names /dev/shm, its size, the batch and the fixes; 0 workers
    (no shared memory) or enough of it pass."""
    folder, paths = tiny_jpegs
    write_list(folder / 'val_list.txt', [f'{path.relative_to(folder)} 0' for path in paths])
    config = make_config(folder, BATCH_SIZE_EVAL=256, IMAGE_SIZE=224, NUM_WORKERS=2)
    dataset = datasets.get_dataset(config, 'val')
    assert dataset.sample_nbytes == 3 * 224 * 224 + 8
    monkeypatch.setattr(datasets.os.path, 'isdir', lambda path: path == '/dev/shm')
    monkeypatch.setattr(datasets.os, 'statvfs', _fake_statvfs(64, 60))
    with pytest.raises(DatasetError) as info:
        datasets.get_dataloader(config, dataset, 'val')
    assert str(info.value) == (
        '/dev/shm is too small for the data loader: 64 MiB (60 MiB free); 1 process(es) x 2 worker(s) x 2 batches '
        'of 36.8 MiB need 147 MiB, and at most 50% of the free space is used. Fix: fewer workers '
        '(DATA.NUM_WORKERS), a smaller batch (DATA.BATCH_SIZE / BATCH_SIZE_EVAL), or more shared memory '
        '(docker run --shm-size=8g)')
    with pytest.raises(DatasetError, match=r'4 process\(es\) x 2 worker\(s\) x 2 batches of 36.8 MiB need 588 MiB'):
        datasets.get_dataloader(config, dataset, 'val', local_processes=4)
    monkeypatch.setattr(datasets.os, 'statvfs', _fake_statvfs(8192, 8000))
    datasets.get_dataloader(config, dataset, 'val', local_processes=4)
    monkeypatch.setattr(datasets.os, 'statvfs', _fake_statvfs(64, 60))
    config.DATA.NUM_WORKERS = 0
    datasets.get_dataloader(config, dataset, 'val')


def test_pretraining_and_erasing_samples_weigh_what_they_carry(tmp_path, tiny_jpegs):
    folder, paths = tiny_jpegs
    write_list(folder / 'train_list.txt', [f'{path.relative_to(folder)} 0' for path in paths])
    config = make_config(folder)
    config.TRAIN.RANDOM_ERASE_COUNT = 3
    dataset = datasets.get_dataset(config, 'train')
    assert dataset.sample_nbytes == sum(field.nbytes for field in dataset[0]) == 3 * 8 * 8 + 8 + 3 * 5 * 8
    config = pretraining_config(folder)
    dataset = datasets.get_pretraining_dataset(config)
    assert dataset.sample_nbytes == sum(field.nbytes for field in dataset[0]) == (
        3 * 16 * 16 + 3 * 32 * 32 + 16 + 8 * config.PRETRAIN.NUM_MASK_PATCHES)  # views, mask, masked positions


@pytest.mark.parametrize(('setting', 'cores', 'processes', 'workers'), [
    (-1, 16, 1, 8), (-1, 16, 4, 4), (-1, 6, 4, 1), (-1, 2, 1, 2), (3, 16, 1, 3), (0, 16, 1, 0), (12, 2, 2, 12)])
def test_loader_workers_scale_with_the_cores_per_process_unless_set(setting, cores, processes, workers,
                                                                    monkeypatch):
    monkeypatch.setattr(datasets.os, 'sched_getaffinity', lambda pid: set(range(cores)))
    config = get_config()
    assert config.DATA.NUM_WORKERS == -1  # the default
    config.DATA.NUM_WORKERS = setting
    assert datasets.loader_workers(config, processes) == workers


@pytest.mark.parametrize('num_workers', [0, 2])
def test_real_jpeg_list_set_loads_through_the_loaders(tiny_jpegs, stub_transforms, num_workers):
    folder, paths = tiny_jpegs
    relative = [path.relative_to(folder) for path in paths]
    write_list(folder / 'val_list.txt', [f'{path} {index % 3}' for index, path in enumerate(relative)])
    write_list(folder / 'train_list.txt', [f'{path} {index % 3}' for index, path in enumerate(relative)])
    config = make_config(folder, NUM_WORKERS=num_workers, BATCH_SIZE=3, BATCH_SIZE_EVAL=3, BAD_IMAGE_POLICY='skip')
    config.TRAIN.RANDOM_ERASE_PROB = 0.0  # its noise could be positive

    val_set = datasets.get_dataset(config, 'val')
    assert (len(val_set), val_set.bad_image_policy, val_set.source) == (7, 'skip', str(folder / 'val_list.txt'))
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in datasets.get_dataloader(config, val_set, 'val')])
    assert [len(batch) for batch in labels] == [3, 3, 1]
    assert np.concatenate(labels).tolist() == [index % 3 for index in range(7)]
    for image, path in zip(np.concatenate(images), paths):
        with Image.open(path) as img:
            np.testing.assert_array_equal(image, transforms.host_normalise(config)(resized_chw(img.convert('RGB'), 8,
                                                                                              halve=False)))

    train_set = datasets.get_dataset(config, 'train')
    train_batches = [(x.numpy(), y.numpy()) for x, y in datasets.get_dataloader(config, train_set, 'train')]
    assert [x.shape for x, _ in train_batches] == [(3, 3, 8, 8)] * 2
    assert (np.concatenate([x for x, _ in train_batches]) < 0).all()  # the train transform (halved) was used
    assert val_set.bad_images == train_set.bad_images == 0


# ---- pre-training -----------------------------------------------------------------------------------------------

def pretraining_config(root, **data):
    config = make_config(root, IMAGE_SIZE=16, **data)
    config.MODEL.PATCH_SIZE = 4  # a 4x4 patch grid
    config.PRETRAIN.SECOND_INPUT_SIZE = 32  # 4x4 tokens of 8 px
    config.PRETRAIN.NUM_MASK_PATCHES = 6
    config.PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK = 2
    return config


@pytest.mark.parametrize('num_workers', [0, 2])
def test_pretraining_set_gives_two_views_and_a_mask_and_ignores_labels(tmp_path, tiny_jpegs, num_workers):
    paths = tiny_jpegs[1]
    bad = _write_bad_files(tmp_path, paths[0])['text']
    lines = [f'{path} {label}' for path, label in zip(paths, (0, 7, 21841, 2, 1, 0, 5))] + [f'{bad} 0']
    write_list(tmp_path / 'train_list.txt', lines)  # labels beyond MODEL.NUM_CLASSES 3: not used
    config = pretraining_config(tmp_path, BATCH_SIZE=4, NUM_WORKERS=num_workers, BAD_IMAGE_POLICY='skip')
    dataset = datasets.get_pretraining_dataset(config)
    assert len(dataset) == 8
    batches = [[part.numpy() for part in batch] for batch in datasets.get_dataloader(config, dataset, 'train')]
    assert len(batches) == 2
    for patch_views, tokenizer_views, masks, positions in batches:
        assert patch_views.shape == (4, 3, 16, 16) and tokenizer_views.shape == (4, 3, 32, 32)
        assert patch_views.dtype == tokenizer_views.dtype == np.float32
        assert masks.shape == (4, 16) and masks.dtype == np.bool_
        assert (masks.sum(axis=1) == 6).all()
        assert positions.shape == (4, 6) and positions.dtype == np.int64
        np.testing.assert_array_equal(positions, [np.flatnonzero(mask) for mask in masks])
        assert tokenizer_views.min() >= 0.1 - 1e-6 and tokenizer_views.max() <= 0.9 + 1e-6
    masks = np.concatenate([batch[2] for batch in batches])
    assert len({mask.tobytes() for mask in masks}) > 4  # a new mask per sample
    assert dataset.bad_images == 1


@pytest.mark.parametrize('num_workers', [0, 2])
def test_pretraining_workers_send_uint8_views_and_the_batch_equals_todays(tiny_jpegs, num_workers):
    """Both views leave the workers as uint8; after the transfer the patch view is normalised and the tokenizer
    view scaled and map_pixels'd, bit for bit what the float32 pipeline of before gave with the same seeds."""
    folder, paths = tiny_jpegs
    write_list(folder / 'train_list.txt', [f'{path.relative_to(folder)} 0' for path in paths])
    config = pretraining_config(folder, BATCH_SIZE=3, NUM_WORKERS=num_workers, IMAGENET_MEAN=IMAGENET_MEAN,
                                IMAGENET_STD=IMAGENET_STD)
    dataset = datasets.get_pretraining_dataset(config)
    dataset.reseed(5)
    loader = datasets.get_dataloader(config, dataset, 'train')
    raw, prepared = _read_raw_and_prepared(loader)
    assert all(batch[0].dtype == batch[1].dtype == np.uint8 for batch in raw)
    normalize = transforms.T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    todays = transforms.TwoViewTransform(dataset.transform.shared,
                                         transforms.T.Compose([_todays_to_chw_float, normalize]),
                                         transforms.T.Compose([_todays_to_chw_float, transforms.map_pixels]))
    expected = []
    for index in _epoch_indices(loader):
        dataset._seed_draws(index)
        expected.append(todays(dataset._first_decodable(index)[0]))
    for field in (0, 1):
        views = np.concatenate([batch[field] for batch in prepared])
        assert views.dtype == np.float32
        np.testing.assert_array_equal(views, np.stack([pair[field] for pair in expected]))
    np.testing.assert_array_equal(np.concatenate([b[2] for b in prepared]), np.concatenate([b[2] for b in raw]))


def test_the_vqkd_tokenizer_view_is_unilms_beit2_view(tiny_jpegs):
    """unilm beit2's DataAugmentationForBEiT: one crop (scale from min_crop_scale) seen by the tokenizer at
    second_input_size with second_interpolation, then ToTensor only: [0, 1], not normalised (the patch view is),
    not map_pixels'd (DALL-E's [0.1, 0.9]). Here: SECOND_INPUT_SIZE 16 (4x4 tokens of VQKD.PATCH_SIZE 4), bicubic."""
    folder, paths = tiny_jpegs
    write_list(folder / 'train_list.txt', [f'{path.relative_to(folder)} 0' for path in paths])
    config = pretraining_config(folder, BATCH_SIZE=3, NUM_WORKERS=0, IMAGENET_MEAN=IMAGENET_MEAN,
                                IMAGENET_STD=IMAGENET_STD)
    config.PRETRAIN.TOKENIZER, config.PRETRAIN.SECOND_INPUT_SIZE = 'vqkd', 16
    config.PRETRAIN.SECOND_INTERPOLATION, config.VQKD.PATCH_SIZE = 'bicubic', 4
    dataset = datasets.get_pretraining_dataset(config)
    crop = dataset.transform.shared.transforms[-1]
    assert (crop.second_size, crop.second_interpolation) == ((16, 16), 'bicubic')
    dataset.reseed(5)
    loader = datasets.get_dataloader(config, dataset, 'train')
    _, prepared = _read_raw_and_prepared(loader)
    normalize = transforms.T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    unilms = transforms.TwoViewTransform(dataset.transform.shared,
                                         transforms.T.Compose([_todays_to_chw_float, normalize]),
                                         _todays_to_chw_float)  # ToTensor alone
    expected = []
    for index in _epoch_indices(loader):
        dataset._seed_draws(index)
        expected.append(unilms(dataset._first_decodable(index)[0]))
    for field in (0, 1):
        views = np.concatenate([batch[field] for batch in prepared])
        assert views.dtype == np.float32
        np.testing.assert_array_equal(views, np.stack([pair[field] for pair in expected]))
    tokenizer_views = np.concatenate([batch[1] for batch in prepared])
    assert tokenizer_views.shape[1:] == (3, 16, 16)
    assert 0 <= tokenizer_views.min() < 0.1 < 0.9 < tokenizer_views.max() <= 1  # the whole [0, 1] range


def test_pretraining_reads_image_folders_with_any_class_count(tmp_path, tiny_jpegs):
    folder, _ = tiny_jpegs
    (tmp_path / 'train').symlink_to(folder)  # 3 class folders; MODEL.NUM_CLASSES says 5
    config = pretraining_config(tmp_path, DATASET='imagefolder')
    config.MODEL.NUM_CLASSES = 5
    dataset = datasets.get_pretraining_dataset(config)
    assert len(dataset) == 7
    patch_view, tokenizer_view, mask, positions = dataset[0]
    assert patch_view.shape == (3, 16, 16) and tokenizer_view.shape == (3, 32, 32) and mask.sum() == 6
    np.testing.assert_array_equal(positions, np.flatnonzero(mask))
    with pytest.raises(DatasetError, match='3 class folders, but MODEL.NUM_CLASSES is 5'):
        datasets.get_dataset(config, 'train')


def test_reseed_makes_a_samples_draws_depend_on_the_epoch_seed_and_its_index(tiny_jpegs):
    """After reseed, sample i's draws from python's and numpy's generators (a stand-in transform records them) are
    a function of (seed, i): the same for the same seed in any order of loading, new for every other sample and
    for the seed of another epoch, SEED or rank (derived as job._start_epoch derives them)."""
    _, paths = tiny_jpegs
    dataset = LabeledImageDataset([Sample(str(path), 0) for path in paths],
                                  lambda image: (random.random(), float(np.random.random())))

    def draws(seed, order):
        dataset.reseed(seed)
        drawn = {index: dataset[index][0] for index in order}
        return [drawn[index] for index in range(len(paths))]

    order = list(range(len(paths)))
    first = draws(derived_seed(0, 1, 0), order)
    assert draws(derived_seed(0, 1, 0), order[::-1]) == first
    values = {value for pair in first for value in pair}
    assert len(values) == 2 * len(paths)
    for other in (derived_seed(0, 2, 0), derived_seed(1, 1, 0), derived_seed(0, 1, 1)):
        assert not values & {value for pair in draws(other, order) for value in pair}
