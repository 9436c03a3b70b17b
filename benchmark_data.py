"""Training data pipeline throughput (images/s), ours next to timm's on the same JPEGs in the same run.

    python benchmark_data.py -cfg configs/beit_base_patch16_224.yaml -photos tests/photos -num_images 256

The photos are Debian's darknet sample images; an empty -photos folder is filled by tests/fetch_photos.sh.

Builds a list-file set of ImageNet-sized JPEGs cut from the given real photos, then reads one epoch through
our train pipeline (RandomResizedCrop, flip, RandAugment in the workers, which send uint8; normalisation and
random erasing after the transfer, here on the CPU; paddle.io loader) and through timm's
``create_transform(is_training=True)`` with the same recipe (torch loader, which normalises and erases in the
workers and sends float32), for 0, 1 and 2 workers. Prints what one batch weighs in the loader's shared memory.
Needs torch and timm for the reference column.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from config import get_config
from datasets import get_dataloader, get_dataset

IMAGENET_TYPICAL_SIDES = (330, 500)  # ImageNet train images are mostly 333-500 px on the long side


def write_jpeg_set(photo_dir: str, folder: str, num_images: int, num_classes: int, seed: int = 0) -> None:
    """Random ImageNet-sized crops of real photos, saved as JPEGs with a train_list.txt."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(os.path.join(photo_dir, name)).convert('RGB') for name in sorted(os.listdir(photo_dir))]
    lines = []
    for index in range(num_images):
        photo = photos[index % len(photos)]
        width, height = (int(side) for side in rng.integers(*IMAGENET_TYPICAL_SIDES, size=2))
        width, height = min(width, photo.width), min(height, photo.height)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        name = f'img_{index:05d}.JPEG'
        photo.crop((left, top, left + width, top + height)).save(os.path.join(folder, name), quality=90)
        lines.append(f'{name} {index % num_classes}')
    for split in ('train', 'val'):
        with open(os.path.join(folder, f'{split}_list.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')


def images_per_second(loader, batch_size: int) -> float:
    start = time.perf_counter()
    count = sum(batch_size for _ in loader)
    return count / (time.perf_counter() - start)


def shared_memory_per_batch(config) -> tuple[int, int]:
    """Bytes of one train batch through the workers' shared memory: ours (uint8 images, labels, erase boxes), and
    the same images as float32 with labels, what the loader sent before."""
    sample_nbytes = get_dataset(config, 'train').sample_nbytes
    float_sample = 4 * 3 * config.DATA.IMAGE_SIZE ** 2 + np.dtype(np.int64).itemsize
    return config.DATA.BATCH_SIZE * sample_nbytes, config.DATA.BATCH_SIZE * float_sample


def ours(config, num_workers: int, on_device: bool = True) -> float:
    """Our loader's img/s; ``on_device`` False leaves out the normalisation and random erasing after the transfer
    (on a CPU they run in the training process, on a GPU on the device)."""
    config.DATA.NUM_WORKERS = num_workers
    loader = get_dataloader(config, get_dataset(config, 'train'), 'train')
    if not on_device:
        loader.on_device = None
    return images_per_second(loader, config.DATA.BATCH_SIZE)


def _let_timm_posterize_to_black() -> None:
    """timm's posterize ops crash on Pillow 13 when 0 bits are kept (Pillow 10 gave black); restore that."""
    from timm.data import auto_augment

    def posterize(img, bits, **kwargs):
        return Image.new(img.mode, img.size) if bits <= 0 else auto_augment.posterize(img, bits, **kwargs)
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        auto_augment.NAME_TO_OP[name] = posterize


def timms(config, num_workers: int) -> float:
    import torch
    from timm.data import create_transform
    from torchvision.datasets.folder import default_loader
    _let_timm_posterize_to_black()
    train = config.TRAIN
    transform = create_transform(config.DATA.IMAGE_SIZE, is_training=True, scale=tuple(train.RRC_SCALE),
                                 ratio=tuple(train.RRC_RATIO), hflip=train.HFLIP_PROB,
                                 auto_augment=train.RAND_AUGMENT_CONFIG, interpolation=config.DATA.INTERPOLATION,
                                 mean=tuple(config.DATA.IMAGENET_MEAN), std=tuple(config.DATA.IMAGENET_STD),
                                 re_prob=train.RANDOM_ERASE_PROB, re_mode=train.RANDOM_ERASE_MODE,
                                 re_count=train.RANDOM_ERASE_COUNT)
    with open(os.path.join(config.DATA.DATA_PATH, 'train_list.txt')) as f:
        entries = [line.rsplit(None, 1) for line in f if line.strip()]

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(entries)

        def __getitem__(self, index):
            path, label = entries[index]
            return transform(default_loader(os.path.join(config.DATA.DATA_PATH, path))), int(label)

    loader = torch.utils.data.DataLoader(ListDataset(), batch_size=config.DATA.BATCH_SIZE, shuffle=True,
                                         drop_last=True, num_workers=num_workers)
    return images_per_second(loader, config.DATA.BATCH_SIZE)


HERE = os.path.dirname(os.path.abspath(__file__))
FETCH_PHOTOS = os.path.join(HERE, 'tests', 'fetch_photos.sh')


def photos_in(folder: str) -> str:
    """``folder``, after fetching Debian's darknet sample photos into it when it has no JPEGs (a fresh clone);
    exits with what to do when they cannot be had."""
    def has_photos() -> bool:
        return os.path.isdir(folder) and any(name.lower().endswith('.jpg') for name in os.listdir(folder))
    if not has_photos():
        print(f'no photos in {folder}: fetching them with {FETCH_PHOTOS}', file=sys.stderr)
        fetched = subprocess.run(['bash', FETCH_PHOTOS, folder]).returncode == 0
        if not fetched or not has_photos():
            sys.exit(f'error: no JPEG photos in {folder}; give -photos DIR (real photos, a few hundred px), or run '
                     f'bash {FETCH_PHOTOS} {folder} where apt-get can download Debian\'s darknet package')
    return folder


def main() -> None:
    parser = argparse.ArgumentParser('BEiT training data pipeline throughput')
    parser.add_argument('-cfg', default=os.path.join(HERE, 'configs', 'beit_base_patch16_224.yaml'))
    parser.add_argument('-photos', default=os.path.join(HERE, 'tests', 'photos'),
                        help='folder of real photos to cut the images from (fetched from Debian when empty)')
    parser.add_argument('-num_images', type=int, default=256)
    parser.add_argument('-batch_size', type=int, default=32)
    parser.add_argument('-workers', type=int, nargs='+', default=[0, 1, 2])
    args = parser.parse_args()
    config = get_config(args.cfg)
    config.DATA.BATCH_SIZE = args.batch_size
    with tempfile.TemporaryDirectory() as folder:
        write_jpeg_set(photos_in(args.photos), folder, args.num_images, config.MODEL.NUM_CLASSES)
        config.DATA.DATA_PATH = folder
        print(f'{args.num_images} JPEGs, {config.DATA.IMAGE_SIZE} px crops, batch {args.batch_size}, '
              f'{os.cpu_count()} cores')
        uint8_bytes, float32_bytes = shared_memory_per_batch(config)
        print(f'shared memory per batch of {args.batch_size}: {uint8_bytes / 2 ** 20:.1f} MiB '
              f'({float32_bytes / 2 ** 20:.1f} MiB as float32)')
        print(f'{"workers":>8} {"paddle-beit img/s":>18} {"timm img/s":>11} {"ratio":>6} '
              f'{"paddle-beit uint8 only":>23}')
        for workers in args.workers:
            ours_rate, timm_rate = ours(config, workers), timms(config, workers)
            uint8_rate = ours(config, workers, on_device=False)
            print(f'{workers:>8} {ours_rate:>18.1f} {timm_rate:>11.1f} {ours_rate / timm_rate:>6.2f} '
                  f'{uint8_rate:>23.1f}')


if __name__ == '__main__':
    main()
