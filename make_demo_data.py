"""Builds the embedded demo dataset: a balanced, fixed-seed subset of Fashion-MNIST in the list-file layout.

    apt-get install dataset-fashion-mnist      # Debian/Ubuntu: Zalando's files, MIT licence
    python make_demo_data.py                   # writes data/fashion_mnist/

Real photos of clothes (28x28 grey) rather than synthetic pictures, so that the demo shows learning on real
images; small enough (a few MB) to live in the repository, so that the demo needs no download. Training images
come from the official train split, validation images from the official test split. The same source files,
counts and seed give byte-identical output, so the committed set can be checked against a rerun.

Output: ``train/<k>_<class>/train_<index>.png``, ``val/<k>_<class>/t10k_<index>.png`` (``index`` is the image's
position in the source file), ``train_list.txt`` and ``val_list.txt`` (``path label``), ``classes.txt`` (one
name per line, line k is label k), ``README.md`` and ``LICENSE``. The class folders sort in label order, so the
set also reads as an image folder (``DATA.DATASET imagefolder``).
"""
import argparse
import gzip
import hashlib
import os
import sys

import numpy as np
from PIL import Image

from demo_data import SourceError, prepare_output, write_text
from errors import EXIT_BAD_INPUT

DEFAULT_SOURCE = '/usr/share/datasets/fashion-mnist'
DEFAULT_OUTPUT = os.path.join('data', 'fashion_mnist')
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot')
SPLITS = {'train': 'train', 'val': 't10k'}  # our split -> source file prefix (t10k is the official test set)
README_MARKER = 'Made by make_demo_data.py'
_IDX_UBYTE = 0x08


def read_idx_ubyte(path: str) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST's format, gzip-compressed) as an array of its declared shape."""
    if not os.path.isfile(path):
        raise SourceError(f'{path} not found; install Debian\'s dataset-fashion-mnist package or pass -source')
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise SourceError(f'{path}: not a readable gzip file ({err})') from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise SourceError(f'{path}: not an idx file of unsigned bytes (bad magic number)')
    ndim = data[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header_size], dtype='>u4'))
    if len(shape) != ndim or len(data) - header_size != int(np.prod(shape)):
        raise SourceError(f'{path}: {len(data) - header_size} data bytes do not match the declared shape {shape}')
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_split(source: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of one official split."""
    images = read_idx_ubyte(os.path.join(source, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx_ubyte(os.path.join(source, f'{prefix}-labels-idx1-ubyte.gz'))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SourceError(f'{source}: {prefix} images {images.shape} and labels {labels.shape} do not pair up')
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise SourceError(f'{source}: {prefix} labels go up to {labels.max()}, expected < {len(CLASS_NAMES)}')
    return images, labels


def select_balanced(labels: np.ndarray, per_class: int, seed: int) -> list[np.ndarray]:
    """For each class, ``per_class`` sorted source indices drawn without replacement by a seeded generator."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(len(CLASS_NAMES)):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            raise SourceError(f'class {label} ({CLASS_NAMES[label]}) has {len(candidates)} images, '
                              f'{per_class} requested')
        chosen.append(np.sort(rng.choice(candidates, size=per_class, replace=False)))
    return chosen


def class_folder(label: int) -> str:
    """'0_t-shirt_top': the label first, so that sorted folder names follow the label order."""
    return f'{label}_' + CLASS_NAMES[label].lower().replace('/', '_').replace(' ', '_')


def write_split(images: np.ndarray, chosen: list[np.ndarray], output: str, split: str, prefix: str) -> list[str]:
    """Save the chosen images as grey PNGs; returns the list-file lines."""
    lines = []
    for label, indices in enumerate(chosen):
        folder = os.path.join(split, class_folder(label))
        os.makedirs(os.path.join(output, folder))
        for index in indices:
            relative_path = f'{folder}/{prefix}_{index:05d}.png'
            Image.fromarray(images[index]).save(os.path.join(output, relative_path), compress_level=9)
            lines.append(f'{relative_path} {label}')
    return lines


def sha256_of(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def readme_text(source: str, counts: dict, seed: int) -> str:
    """Attribution and provenance: what the set is, where it came from, how to rebuild it."""
    files = sorted(name for prefix in SPLITS.values() for name in os.listdir(source) if name.startswith(prefix))
    checksums = '\n'.join(f'    {sha256_of(os.path.join(source, name))}  {name}' for name in files)
    classes = '\n'.join(f'| {label} | {name} | `{class_folder(label)}` |' for label, name in enumerate(CLASS_NAMES))
    return f"""# Fashion-MNIST demo subset

{README_MARKER} from Debian's `dataset-fashion-mnist` package.
Fashion-MNIST is Zalando's dataset of article images (Han Xiao, Kashif Rasul, Roland Vollgraf, "Fashion-MNIST:
a Novel Image Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747,
https://github.com/zalandoresearch/fashion-mnist), released under the MIT licence (see LICENSE).

- train: {counts['train']} images per class from the official training split (60,000 images)
- val: {counts['val']} images per class from the official test split (10,000 images)
- selection: numpy `default_rng({seed})`, one draw per class without replacement, sorted by source index; a
  file's name holds its index in the source file
- images: 28x28 8-bit grey PNG, pixels unchanged

| label | class | folder |
|---|---|---|
{classes}

Rebuild (gives identical files):

    apt-get install dataset-fashion-mnist
    python make_demo_data.py -train_per_class {counts['train']} -val_per_class {counts['val']} -seed {seed}

Source files (SHA-256):

{checksums}
"""


LICENSE_TEXT = """The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO
THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS
IN THE SOFTWARE.
"""


def make_demo_data(source: str, output: str, train_per_class: int, val_per_class: int, seed: int) -> None:
    """Read the source splits first, so that a bad source leaves an existing output untouched."""
    counts = {'train': train_per_class, 'val': val_per_class}
    selections = {}
    for split, prefix in SPLITS.items():
        images, labels = read_split(source, prefix)
        selections[split] = (images, select_balanced(labels, counts[split], seed))
    prepare_output(output, README_MARKER)
    for split, (images, chosen) in selections.items():
        lines = write_split(images, chosen, output, split, SPLITS[split])
        write_text(os.path.join(output, f'{split}_list.txt'), '\n'.join(lines) + '\n')
    write_text(os.path.join(output, 'classes.txt'), '\n'.join(CLASS_NAMES) + '\n')
    write_text(os.path.join(output, 'LICENSE'), LICENSE_TEXT)
    write_text(os.path.join(output, 'README.md'), readme_text(source, counts, seed))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Build the Fashion-MNIST demo subset in the list-file layout')
    parser.add_argument('-source', default=DEFAULT_SOURCE, help='folder of the *-ubyte.gz files')
    parser.add_argument('-output', default=DEFAULT_OUTPUT)
    parser.add_argument('-train_per_class', type=int, default=500)
    parser.add_argument('-val_per_class', type=int, default=100)
    parser.add_argument('-seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.train_per_class < 1 or args.val_per_class < 1:
        parser.error('-train_per_class and -val_per_class must be positive')
    try:
        make_demo_data(args.source, args.output, args.train_per_class, args.val_per_class, args.seed)
    except SourceError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f'wrote {len(CLASS_NAMES)} classes x ({args.train_per_class} train + {args.val_per_class} val) '
          f'images to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
