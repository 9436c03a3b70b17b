"""ImageNet-style data for fine-tuning and pre-training: a config's split as a dataset (decoding, the bad-image
policy, the transforms) and the paddle.io loaders (shuffled shards for training, exact unpadded shards for
evaluation).

``DATA.DATASET: imagenet2012`` reads ``DATA_PATH/train_list.txt`` and ``val_list.txt``; ``imagefolder`` reads the
class folders ``DATA_PATH/train/<class>/...`` and ``DATA_PATH/val/<class>/...`` (formats and checks:
sample_sources.py). Pre-training (``get_pretraining_dataset``) reads the train split the same way and ignores the
labels: a list file still needs its label field, but any integer is accepted, and an image folder may hold any
number of classes.
"""
import logging
import multiprocessing
import os
import random
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import paddle.distributed as dist
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from PIL import Image

from config import BAD_IMAGE_POLICIES, DATASETS
from device_batch import TOKENIZER_INPUTS, ClassificationBatch, NormaliseAndErase, PretrainingBatch
from image_files import DECODE_ERRORS, load_rgb_image
from masking_generator import MaskingGenerator, masked_positions
from random_erasing import RandomErasing
from sample_sources import DatasetError, data_root, scan_image_folder, validate_list_file
from sample_table import Sample, SampleTable, checked_once
from transforms import get_pretrain_transforms, get_train_erasing, get_train_transforms, get_val_transforms
from utils import die_with_parent

MODES = ('train', 'val')
_log = logging.getLogger(__name__)


class LabeledImageDataset(Dataset):
    """(image, int64 label) pairs; ``transform`` turns the RGB PIL image into the model input. With ``erasing``
    (the transform then gives uint8 CHW images) a sample is (image, label, erase boxes): ``erasing.draw``'s boxes,
    drawn after the transform's draws, which ``on_device`` applies to the batch after the transfer.
    ``on_device`` (a batch -> batch function; None: the batch as it is) is what get_dataloader applies to each
    batch it yields; ``sample_nbytes`` (None: unknown) what a sample weighs in the loader's shared memory.

    A file that does not decode follows ``bad_image_policy``. 'error' raises a DatasetError naming the file and
    its list line (a loader from get_dataloader re-raises it in the caller's process, with or without workers).
    'skip' serves the next decodable sample in list order (wrapping round) with its own label, logs a warning,
    and marks the file in a flag array in shared memory: DataLoader workers are separate processes, and through
    the flags ``bad_images`` in the main process counts every distinct bad file that any worker has met. A
    flagged file is not decoded again.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, bad_image_policy: str = 'error',
                 source: str = '', *, erasing: RandomErasing | None = None, on_device: Callable | None = None,
                 sample_nbytes: int | None = None):
        if bad_image_policy not in BAD_IMAGE_POLICIES:  # a caller's typo would otherwise act as 'skip'
            raise ValueError(f'bad_image_policy must be one of {list(BAD_IMAGE_POLICIES)}, got {bad_image_policy!r}')
        if not samples:
            raise DatasetError(f'{source or "dataset"}: no samples')
        self.samples = samples
        self.transform = transform
        self.bad_image_policy = bad_image_policy
        self.source = source  # the list file or folder, for messages
        self._bad_flags = multiprocessing.RawArray('B', len(self.samples))
        self.seed = None
        self.erasing = erasing
        self.on_device = on_device
        self.sample_nbytes = sample_nbytes

    def reseed(self, seed: int) -> None:
        """From now on sample i's random draws (python's and numpy's generators, which the transforms use) depend
        on (seed, i) alone, not on which loader worker, or none, loads it. Workers are forked at each epoch's
        start (get_dataloader), so call it before the epoch's iteration."""
        self.seed = seed

    def _seed_draws(self, index: int) -> None:
        if self.seed is not None:
            seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
            random.seed(seed)
            np.random.seed(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        self._seed_draws(index)
        image, sample = self._first_decodable(index)
        pixels = self.transform(image)
        if self.erasing is None:
            return pixels, np.int64(sample.label)
        return pixels, np.int64(sample.label), self.erasing.draw(*pixels.shape[-2:])

    def _first_decodable(self, index: int) -> tuple[Image.Image, Sample]:
        """Sample ``index``'s image, or under policy 'skip' that of the next decodable sample in list order."""
        for offset in range(len(self.samples)):
            candidate = (index + offset) % len(self.samples)
            image = self._decode(candidate)
            if image is not None:
                return image, self.samples[candidate]
        raise DatasetError(f'{self.source or "dataset"}: none of the {len(self)} images decodes')

    @property
    def bad_images(self) -> int:
        """Distinct undecodable files met so far (policy 'skip'), by this process and its DataLoader workers."""
        return int(np.frombuffer(self._bad_flags, dtype=np.uint8).sum())

    def bad_image_paths(self) -> list[str]:
        return [self.samples[i].path for i in np.flatnonzero(np.frombuffer(self._bad_flags, dtype=np.uint8))]

    def _describe(self, sample: Sample) -> str:
        """How messages name a sample: its path, and for a list entry the list file and line."""
        return f'{sample.path} ({self.source} line {sample.line})' if sample.line else sample.path

    def _decode(self, index: int) -> Image.Image | None:
        """The RGB image of sample ``index``, or None when it is bad and the policy is 'skip'."""
        if self._bad_flags[index]:
            return None
        sample = self.samples[index]
        try:
            return load_rgb_image(sample.path)
        except DECODE_ERRORS as err:
            if self.bad_image_policy == 'error':
                raise DatasetError(f'cannot decode image {self._describe(sample)}: {err}') from err
            self._bad_flags[index] = 1
            _log.warning('skipping undecodable image %s: %s', self._describe(sample), err)
            return None


class MaskedImageDataset(LabeledImageDataset):
    """Pre-training samples: (patch view uint8 CHW, tokenizer view uint8 CHW, mask bool [N], masked positions
    int64 [NUM_MASK_PATCHES]); labels unused.

    ``transform`` gives the two views of one crop (transforms.get_pretrain_transforms), ``mask_generator`` a new
    (H, W) 0/1 mask of the patch grid per sample, flattened in the row-major order of the patch tokens; the
    positions are its masked indices (masking_generator.masked_positions), a fixed count per sample.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable, mask_generator: MaskingGenerator,
                 bad_image_policy: str = 'error', source: str = '', *, on_device: Callable | None = None,
                 sample_nbytes: int | None = None):
        super().__init__(samples, transform, bad_image_policy, source, on_device=on_device,
                         sample_nbytes=sample_nbytes)
        self.mask_generator = mask_generator

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._seed_draws(index)
        image, _ = self._first_decodable(index)
        patch_view, tokenizer_view = self.transform(image)
        mask = np.asarray(self.mask_generator(), dtype=bool).reshape(-1)
        return patch_view, tokenizer_view, mask, masked_positions(mask, self.mask_generator.num_masking_patches)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f'mode must be one of {list(MODES)}, got {mode!r}')


def _checked_samples(config, mode: str, num_classes: int | None) -> tuple[SampleTable, str]:
    """The samples of ``mode`` in ``config``'s data and where they were listed (list file or folder)."""
    _check_mode(mode)
    root = data_root(config)
    if config.DATA.DATASET == 'imagenet2012':
        source = os.path.join(root, f'{mode}_list.txt')
        return checked_once(source, num_classes, lambda: validate_list_file(source, root, num_classes)), source
    if config.DATA.DATASET == 'imagefolder':
        source = os.path.join(root, mode)
        return checked_once(source, num_classes, lambda: scan_image_folder(source, num_classes)), source
    # reached by a config changed after validate_config (from Python), which would otherwise return None
    raise DatasetError(f'DATA.DATASET must be one of {list(DATASETS)}, got {config.DATA.DATASET!r}')


def _image_nbytes(size: int) -> int:
    return 3 * size * size  # uint8 RGB


def get_dataset(config, mode: str, build_transform: Callable | None = None) -> LabeledImageDataset:
    """The checked train or val dataset of ``config`` with the transform ``build_transform(config)`` gives (uint8
    images), by default the split's own from transforms.py; the fine-tuning train transform comes with its random
    erasing. Its batches are normalised (and erased) on the device."""
    samples, source = _checked_samples(config, mode, config.MODEL.NUM_CLASSES)
    if build_transform is None:
        build_transform = get_train_transforms if mode == 'train' else get_val_transforms
    erasing = get_train_erasing(config) if build_transform is get_train_transforms else None
    nbytes = _image_nbytes(config.DATA.IMAGE_SIZE) + np.dtype(np.int64).itemsize
    if erasing is not None:
        nbytes += erasing.boxes_nbytes
    return LabeledImageDataset(samples, build_transform(config), config.DATA.BAD_IMAGE_POLICY, source,
                               erasing=erasing, on_device=ClassificationBatch(NormaliseAndErase.from_config(
                                   config, erasing)), sample_nbytes=nbytes)


def build_mask_generator(config) -> MaskingGenerator:
    """Blockwise masking of the patch grid with the PRETRAIN.* counts (unilm's defaults for the block shapes)."""
    grid = config.DATA.IMAGE_SIZE // config.MODEL.PATCH_SIZE
    pretrain = config.PRETRAIN
    return MaskingGenerator((grid, grid), pretrain.NUM_MASK_PATCHES,
                            min_num_patches=pretrain.MIN_MASK_PATCHES_PER_BLOCK,
                            max_num_patches=pretrain.MAX_MASK_PATCHES_PER_BLOCK or None)


def get_pretraining_dataset(config) -> MaskedImageDataset:
    """The checked train split of ``config`` as pre-training samples (labels unused)."""
    samples, source = _checked_samples(config, 'train', num_classes=None)
    grid = config.DATA.IMAGE_SIZE // config.MODEL.PATCH_SIZE
    nbytes = (_image_nbytes(config.DATA.IMAGE_SIZE) + _image_nbytes(config.PRETRAIN.SECOND_INPUT_SIZE)
              + grid * grid + np.dtype(np.int64).itemsize * config.PRETRAIN.NUM_MASK_PATCHES)  # mask, positions
    return MaskedImageDataset(samples, get_pretrain_transforms(config), build_mask_generator(config),
                              config.DATA.BAD_IMAGE_POLICY, source,
                              on_device=PretrainingBatch(NormaliseAndErase.from_config(config),
                                                         TOKENIZER_INPUTS[config.PRETRAIN.TOKENIZER]),
                              sample_nbytes=nbytes)


class ShardedEvalBatchSampler:
    """In-order batches of one rank's contiguous shard of an evaluation set.

    The shards of ranks 0..world_size-1 are disjoint and together hold every index exactly once: nothing is
    padded, so exact accuracy is the sum of correct counts over ranks divided by the sum of sample counts.
    Shard lengths differ by at most one (a rank may get none when there are fewer samples than ranks).
    DistributedBatchSampler instead repeats samples to give every rank the same count.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_samples < 0:
            raise ValueError(f'need batch_size >= 1, world_size >= 1, 0 <= rank < world_size, num_samples >= 0; '
                             f'got {batch_size}, {world_size}, {rank}, {num_samples}')
        self.indices = range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[start:start + self.batch_size])

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


class BatchExtra(NamedTuple):
    """Arrays drawn for a whole training batch by get_dataloader's ``batch_draws``; they travel to the collate as
    the batch's last index and are appended to its fields."""
    arrays: tuple


class _DrawingBatchSampler:
    """``batch_sampler``'s batches, each with ``draw(len(indices))`` as a last BatchExtra index. Drawn here, in
    batch order, so the draws are the same whatever the number of loader workers."""

    def __init__(self, batch_sampler, draw: Callable[[int], tuple]):
        self.batch_sampler, self.draw = batch_sampler, draw

    def __iter__(self) -> Iterator[list]:
        for indices in self.batch_sampler:
            yield [*indices, BatchExtra(tuple(self.draw(len(indices))))]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


class _LoadFailure(NamedTuple):
    message: str
    is_dataset_error: bool


class _FailureAsSampleDataset(Dataset):
    """Hands a sample's exception on as data, because Paddle 3.3.1's DataLoader loses it: without workers the
    reader thread dies and the caller waits forever; with workers the caller gets only 'Blocking queue is killed'."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if isinstance(index, BatchExtra):
            return index
        try:
            return self.dataset[index]
        except Exception as err:
            if isinstance(err, DatasetError):
                return _LoadFailure(str(err), True)
            return _LoadFailure(f'loading sample {index} failed:\n{traceback.format_exc()}', False)


def _collate_or_failure(samples: list):
    """Each field of the samples stacked ([images NCHW, int64 labels]; for pre-training [patch views, tokenizer
    views, masks, masked positions]), or the first failure in the batch as a dict of plain values, which Paddle
    passes to the main process as they are (the array only keeps its queue from being empty)."""
    failure = next((sample for sample in samples if isinstance(sample, _LoadFailure)), None)
    if failure is None:
        return [np.stack(field) for field in zip(*samples)]
    return {'failure': failure.message, 'is_dataset_error': failure.is_dataset_error, 'marker': np.zeros(1)}


def _collate_with_extra(samples: list):
    """_collate_or_failure of the samples, then the arrays of the batch's BatchExtra (its last entry)."""
    batch = _collate_or_failure(samples[:-1])
    return batch if isinstance(batch, dict) else [*batch, *samples[-1].arrays]


class FailFastDataLoader(DataLoader):
    """A DataLoader whose iteration raises a sample's failure in the caller's process: a DatasetError (bad image
    under policy 'error') as a DatasetError with the same message, anything else as a RuntimeError carrying the
    worker's traceback. Each batch is passed through ``on_device`` (if given) after the transfer: normalisation
    and random erasing of the uint8 images. Use it through get_dataloader."""

    def __init__(self, *args, on_device: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_device = on_device

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, dict):
                error_type = DatasetError if batch['is_dataset_error'] else RuntimeError
                raise error_type(batch['failure'])
            yield batch if self.on_device is None else self.on_device(batch)


MAX_AUTO_WORKERS = 8
PREFETCH_FACTOR = 2  # batches each worker keeps ready (Paddle's default)
SHM_FOLDER = '/dev/shm'
SHM_HEADROOM = 0.5  # batches in flight may fill at most this fraction of the free shared memory


def loader_workers(config, local_processes: int = 1) -> int:
    """DATA.NUM_WORKERS, or for -1 (the default) min(8, this machine's cores // its training processes), at least
    1: enough to feed a GPU with RandAugment when the cores are there; 0 loads in the training process."""
    if config.DATA.NUM_WORKERS >= 0:
        return config.DATA.NUM_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local_processes)))


def check_shared_memory(batch_nbytes: int, num_workers: int, local_processes: int = 1) -> None:
    """Raise a DatasetError, before training starts, when the batches the workers keep in flight (PREFETCH_FACTOR
    per worker, for each training process on this machine) would not fit in SHM_HEADROOM of /dev/shm's free
    space: past it a worker dies of a bus error (Docker gives containers 64 MB unless told otherwise)."""
    if num_workers == 0 or not os.path.isdir(SHM_FOLDER):
        return
    stats = os.statvfs(SHM_FOLDER)
    free, size = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    needed = batch_nbytes * PREFETCH_FACTOR * num_workers * local_processes
    if needed > SHM_HEADROOM * free:
        mib = 2 ** 20
        raise DatasetError(
            f'{SHM_FOLDER} is too small for the data loader: {size / mib:.0f} MiB ({free / mib:.0f} MiB free); '
            f'{local_processes} process(es) x {num_workers} worker(s) x {PREFETCH_FACTOR} batches of '
            f'{batch_nbytes / mib:.1f} MiB need {needed / mib:.0f} MiB, and at most {SHM_HEADROOM:.0%} of the free '
            f'space is used. Fix: fewer workers (DATA.NUM_WORKERS), a smaller batch (DATA.BATCH_SIZE / '
            f'BATCH_SIZE_EVAL), or more shared memory (docker run --shm-size=8g)')


def get_dataloader(config, dataset: Dataset, mode: str, multi_process: bool = False, *, local_processes: int = 1,
                   batch_draws: Callable[[int], tuple] | None = None) -> FailFastDataLoader:
    """A loader over ``dataset``; with ``multi_process`` each rank reads its own share. ``batch_draws`` (train
    only): ``batch_draws(batch_size)`` gives arrays appended to each batch (Mixup's draws), called in this
    process in batch order as the loader fetches, so the step copies nothing from the host.

    train: DistributedBatchSampler (also for one process, so the caller can always ``loader.batch_sampler
    .set_epoch(epoch)``; its order depends on the epoch only) shuffles and drops the last partial batch;
    DATA.BATCH_SIZE per process; several ranks share out a set padded to a multiple of their number. val:
    ShardedEvalBatchSampler keeps the order and every sample exactly once over all ranks; DATA.BATCH_SIZE_EVAL per
    process. ``loader_workers`` worker processes (``local_processes``: the training processes on this machine),
    started each epoch: with Paddle 3.3.1's persistent workers, leaving an epoch early breaks the next one
    (IndexError in the loader); a DatasetError when their batches would not fit in /dev/shm. Batches pass through
    the dataset's ``on_device``. ``loader.dataset`` wraps ``dataset``: keep your own reference to read
    ``bad_images``.
    """
    _check_mode(mode)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if multi_process else (0, 1)
    if mode == 'train':
        batch_size = config.DATA.BATCH_SIZE
        batch_sampler = DistributedBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank,
                                                shuffle=True, drop_last=True)
        if len(batch_sampler) == 0:
            raise DatasetError(f'the train set has {len(dataset)} samples: no full batch of DATA.BATCH_SIZE '
                               f'{config.DATA.BATCH_SIZE} for each of {world_size} process(es)')
    elif batch_draws is not None:
        raise ValueError('batch_draws are for training batches only')
    else:
        batch_size = config.DATA.BATCH_SIZE_EVAL
        batch_sampler = ShardedEvalBatchSampler(len(dataset), batch_size, rank, world_size)
    num_workers = loader_workers(config, local_processes)
    sample_nbytes = getattr(dataset, 'sample_nbytes', None)
    if sample_nbytes is not None:
        check_shared_memory(sample_nbytes * batch_size, num_workers, local_processes)
    collate = _collate_or_failure
    if batch_draws is not None:
        batch_sampler, collate = _DrawingBatchSampler(batch_sampler, batch_draws), _collate_with_extra
    return FailFastDataLoader(_FailureAsSampleDataset(dataset), batch_sampler=batch_sampler,
                              num_workers=num_workers, collate_fn=collate, prefetch_factor=PREFETCH_FACTOR,
                              worker_init_fn=die_with_parent, on_device=getattr(dataset, 'on_device', None))
