"""Builds the embedded segmentation demo set: Fashion-MNIST items placed on textured canvases, in ADE20K's layout.

    python make_seg_demo_data.py               # reads data/fashion_mnist/, writes data/fashion_seg/

Each canvas is 96x96, 128x96 or 96x128 pixels (width x height) of a coloured background with two mild waves and
noise; 2 to 4 items, each a 28x28 Fashion-MNIST image of the committed demo subset scaled to 28..56 pixels, tinted
with a random colour and shaded by its grey levels, placed anywhere inside the canvas, a later item over an earlier
one. An item's pixels are those of its scaled grey image at MASK_THRESHOLD or above; the label map holds its class
+ 1 there and 0 (background) elsewhere, so the set has 11 classes without reduce_zero_label. Training canvases take
their items from the subset's train split, validation canvases from its val split (the official test set).

Canvas k of a split is drawn by its own generator, seeded from (seed, split, k), so one canvas can be rebuilt
alone and the same sources, seed and library versions give byte-identical files (JPEG and PNG encoders included).

Output (mmseg's ADE20K layout, SEG.DATASET ade20k): ``images/{training,validation}/<k>.jpg`` (RGB, JPEG quality
95, as seg_datasets reads ``.jpg`` images only), ``annotations/{training,validation}/<k>.png`` (palette PNG: the
value of a pixel is its label), ``classes.txt`` (line k names label k), ``README.md`` and ``LICENSE``.
"""
import argparse
import os
import shutil
import sys
from collections import Counter
from typing import NamedTuple

import numpy as np
from PIL import Image

from demo_data import SourceError, prepare_output, write_text
from errors import EXIT_BAD_INPUT
from sample_sources import DatasetError, validate_list_file

DEFAULT_SOURCE = os.path.join('data', 'fashion_mnist')
DEFAULT_OUTPUT = os.path.join('data', 'fashion_seg')
SPLITS = {'train': 'training', 'val': 'validation'}  # the source's split -> the ADE20K folder it fills
BACKGROUND = 'background'
CANVAS_SIZES = ((96, 96), (128, 96), (96, 128))  # (width, height)
ITEMS_PER_CANVAS = (2, 4)  # inclusive
ITEM_SIZES = (28, 56)  # inclusive: the side of a scaled 28x28 item
MASK_THRESHOLD = 32  # a scaled item's grey level from which its pixel belongs to it (Fashion-MNIST's ground is 0)
MIN_SHADE = 0.25  # an item pixel of grey level g is tint * (MIN_SHADE + (1 - MIN_SHADE) * g / 255)
TINT_RANGE = (48, 255)  # inclusive, per channel
BACKGROUND_RANGE = (40, 215)  # inclusive, per channel: the ground colour before the waves and the noise
WAVES, WAVE_AMPLITUDE, WAVE_CYCLES = 2, (6.0, 20.0), 3.0  # grey levels; cycles per 96 pixels, each direction
NOISE = 6  # every pixel and channel of the finished canvas moves by an integer in [-NOISE, NOISE]
JPEG_QUALITY = 95
README_MARKER = 'Made by make_seg_demo_data.py'
# the annotations' palette, label k's colour at k (so that viewers show the labels): black background, a distinct
# colour for each of Fashion-MNIST's 10 classes
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))


class Item(NamedTuple):
    """One placed item: which source image, where (its top-left pixel), its side in pixels and its tint."""
    source: int
    left: int
    top: int
    size: int
    tint: tuple[int, int, int]


class Canvas(NamedTuple):
    image: np.ndarray  # uint8 HxWx3
    labels: np.ndarray  # uint8 HxW: 0 background, class + 1 on an item
    items: list[Item]


def canvas_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Canvas ``index``'s own generator: a canvas does not depend on how many others are made."""
    return np.random.default_rng([seed, list(SPLITS).index(split), index])


def item_grey(image: np.ndarray, size: int) -> np.ndarray:
    """A 28x28 grey item scaled to ``size`` x ``size`` (bilinear)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """float HxWx3: a ground colour plus WAVES plane waves of random direction, length and phase."""
    colour = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3)
    y, x = np.mgrid[0:height, 0:width] / 96.0
    field = np.zeros((height, width))
    for _ in range(WAVES):
        amplitude = rng.uniform(*WAVE_AMPLITUDE)
        cycles_x, cycles_y = rng.uniform(-WAVE_CYCLES, WAVE_CYCLES, size=2)
        field += amplitude * np.sin(2 * np.pi * (cycles_x * x + cycles_y * y) + rng.uniform(0, 2 * np.pi))
    return colour + field[..., None] * rng.uniform(0.5, 1.0, size=3)


def draw_items(rng: np.random.Generator, width: int, height: int, num_sources: int) -> list[Item]:
    items = []
    for _ in range(rng.integers(ITEMS_PER_CANVAS[0], ITEMS_PER_CANVAS[1] + 1)):
        source = int(rng.integers(num_sources))
        size = int(rng.integers(ITEM_SIZES[0], ITEM_SIZES[1] + 1))
        left, top = int(rng.integers(width - size + 1)), int(rng.integers(height - size + 1))
        tint = tuple(int(v) for v in rng.integers(TINT_RANGE[0], TINT_RANGE[1] + 1, size=3))
        items.append(Item(source, left, top, size, tint))
    return items


def paint(image: np.ndarray, labels: np.ndarray, item: Item, grey: np.ndarray, label: int) -> None:
    """Draw ``item`` (its source image ``grey``, 28x28) over ``image`` (float) and ``labels``, in place."""
    scaled = item_grey(grey, item.size)
    mask = scaled >= MASK_THRESHOLD
    shade = MIN_SHADE + (1 - MIN_SHADE) * scaled[mask, None] / 255.0
    window = np.s_[item.top:item.top + item.size, item.left:item.left + item.size]
    image[window][mask] = np.asarray(item.tint) * shade
    labels[window][mask] = label + 1


def make_canvas(rng: np.random.Generator, sources: np.ndarray, classes: np.ndarray) -> Canvas:
    """One canvas from ``sources`` (N x 28 x 28 grey) of ``classes`` (N labels)."""
    width, height = CANVAS_SIZES[rng.integers(len(CANVAS_SIZES))]
    image = background(rng, width, height)
    labels = np.zeros((height, width), dtype=np.uint8)
    items = draw_items(rng, width, height, len(sources))
    for item in items:
        paint(image, labels, item, sources[item.source], int(classes[item.source]))
    image += rng.integers(-NOISE, NOISE + 1, size=image.shape)
    return Canvas(np.clip(np.rint(image), 0, 255).astype(np.uint8), labels, items)


def read_item(path: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if (img.mode, img.size) != ('L', (28, 28)):
                raise SourceError(f'{path}: expected a 28x28 grey (L) image, got {img.size[0]}x{img.size[1]} '
                                  f'{img.mode}')
            return np.asarray(img)
    except OSError as err:
        raise SourceError(f'cannot decode {path}: {err}') from err


def read_source(source: str) -> tuple[list[str], dict]:
    """(class names, {split: (N x 28 x 28 grey images, N labels)}) of the Fashion-MNIST demo subset."""
    names_path = os.path.join(source, 'classes.txt')
    if not os.path.isfile(names_path):
        raise SourceError(f'{names_path} not found: -source must be the Fashion-MNIST demo set (make_demo_data.py)')
    with open(names_path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != len(PALETTE) - 1:
        raise SourceError(f'{names_path} names {len(names)} classes; Fashion-MNIST has {len(PALETTE) - 1}')
    splits = {}
    for split in SPLITS:
        samples = validate_list_file(os.path.join(source, f'{split}_list.txt'), source, len(names))
        images = [read_item(sample.path) for sample in samples]
        splits[split] = (np.stack(images), np.array([sample.label for sample in samples]))
    return names, splits


def canvas_paths(output: str, split: str, index: int) -> tuple[str, str]:
    folder = SPLITS[split]
    return (os.path.join(output, 'images', folder, f'{index:05d}.jpg'),
            os.path.join(output, 'annotations', folder, f'{index:05d}.png'))


def save_canvas(canvas: Canvas, image_path: str, label_path: str) -> None:
    Image.fromarray(canvas.image).save(image_path, quality=JPEG_QUALITY)
    height, width = canvas.labels.shape
    labels = Image.frombytes('P', (width, height), canvas.labels.tobytes())
    labels.putpalette([channel for colour in PALETTE for channel in colour])
    labels.save(label_path, compress_level=9)


def write_split(output: str, split: str, count: int, seed: int, sources: tuple) -> dict:
    """Canvases 0..count-1 of ``split``; returns what the README reports about them."""
    for kind in ('images', 'annotations'):
        os.makedirs(os.path.join(output, kind, SPLITS[split]))
    sizes, pixels, items = Counter(), np.zeros(len(PALETTE), dtype=np.int64), 0
    for index in range(count):
        canvas = make_canvas(canvas_rng(seed, split, index), *sources)
        save_canvas(canvas, *canvas_paths(output, split, index))
        sizes[canvas.labels.shape[::-1]] += 1
        pixels += np.bincount(canvas.labels.ravel(), minlength=len(pixels))
        items += len(canvas.items)
    return {'count': count, 'sizes': sizes, 'items': items, 'background': pixels[0] / pixels.sum()}


def readme_text(names: list[str], stats: dict, seed: int) -> str:
    classes = '\n'.join(f'| {label} | {name} |' for label, name in enumerate(names))
    lines = []
    for split, folder in SPLITS.items():
        s = stats[split]
        sizes = ', '.join(f'{count} at {w}x{h}' for (w, h), count in sorted(s['sizes'].items()))
        lines.append(f'- {folder}: {s["count"]} canvases ({sizes}; width x height) holding {s["items"]} items '
                     f'from the subset\'s {split} split; background {100 * s["background"]:.1f} % of the pixels')
    listed = '\n'.join(lines)
    train, val = stats['train']['count'], stats['val']['count']
    return f"""# Fashion-MNIST segmentation demo set

{README_MARKER} from the Fashion-MNIST demo subset in `data/fashion_mnist` (Zalando's images, MIT
licence, see LICENSE; Han Xiao, Kashif Rasul, Roland Vollgraf, arXiv:1708.07747,
https://github.com/zalandoresearch/fashion-mnist).

Each canvas is a coloured background with {WAVES} mild waves and noise, and {ITEMS_PER_CANVAS[0]} to
{ITEMS_PER_CANVAS[1]} Fashion-MNIST items: each scaled from 28 to {ITEM_SIZES[0]}..{ITEM_SIZES[1]} pixels
(bilinear), tinted with a random colour, shaded by its grey levels and placed inside the canvas; a later item covers
an earlier one. An item's pixels are those of its scaled image with a grey level of {MASK_THRESHOLD} or more (of 255);
its label there is its class + 1, the background's 0 (so SEG.NUM_CLASSES 11, SEG.REDUCE_ZERO_LABEL False).

{listed}

Layout (mmseg's ADE20K, SEG.DATASET ade20k): `images/<split>/<k>.jpg` (RGB, JPEG quality {JPEG_QUALITY}) and
`annotations/<split>/<k>.png` (palette PNG whose pixel values are the labels).

| label | class |
|---|---|
{classes}

Rebuild (gives identical files with the same Pillow and numpy; canvas k of a split is seeded from the seed, the
split and k):

    python make_seg_demo_data.py -train_canvases {train} -val_canvases {val} -seed {seed}
"""


def make_seg_demo_data(source: str, output: str, train_canvases: int, val_canvases: int, seed: int) -> None:
    """Read the whole source first, so that a bad source leaves an existing output untouched."""
    names, splits = read_source(source)
    license_path = os.path.join(source, 'LICENSE')
    if not os.path.isfile(license_path):
        raise SourceError(f'{license_path} not found: the set is shared under its licence')
    prepare_output(output, README_MARKER)
    counts = {'train': train_canvases, 'val': val_canvases}
    stats = {split: write_split(output, split, counts[split], seed, splits[split]) for split in SPLITS}
    all_names = [BACKGROUND, *names]
    write_text(os.path.join(output, 'classes.txt'), '\n'.join(all_names) + '\n')
    shutil.copyfile(license_path, os.path.join(output, 'LICENSE'))
    write_text(os.path.join(output, 'README.md'), readme_text(all_names, stats, seed))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Build the Fashion-MNIST segmentation demo set in the ADE20K layout')
    parser.add_argument('-source', default=DEFAULT_SOURCE, help='the Fashion-MNIST demo subset (make_demo_data.py)')
    parser.add_argument('-output', default=DEFAULT_OUTPUT)
    parser.add_argument('-train_canvases', type=int, default=600)
    parser.add_argument('-val_canvases', type=int, default=100)
    parser.add_argument('-seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_canvases < 1 or args.val_canvases < 1:
        parser.error('-train_canvases and -val_canvases must be positive')
    if args.seed < 0:
        parser.error('-seed must not be negative')
    try:
        make_seg_demo_data(args.source, args.output, args.train_canvases, args.val_canvases, args.seed)
    except (SourceError, DatasetError) as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f'wrote {args.train_canvases} training and {args.val_canvases} validation canvases to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
