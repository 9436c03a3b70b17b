"""A tiny generated segmentation set in the pair-list layout: rectangles and discs on a noisy canvas, each shape's
pixels labelled with its class (its colour depends on the class), the background class 0. Val images have
different sizes, and their number is odd."""
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = np.array([[40, 40, 40], [220, 60, 60], [60, 200, 60], [60, 80, 230]], np.float32)  # class 0..3
TRAIN_SIZES = [(40, 48)] * 8  # (height, width)
VAL_SIZES = [(36, 50), (44, 40), (30, 62), (52, 34), (40, 40)]


def draw(height: int, width: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, uint8 labels) with 3 shapes of random classes over the background."""
    labels = np.zeros((height, width), np.uint8)
    rows, columns = np.mgrid[:height, :width]
    for _ in range(3):
        cls = rng.integers(1, len(COLOURS))
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        size = rng.integers(6, 16)
        if rng.random() < 0.5:
            labels[top:top + size, left:left + size] = cls
        else:
            labels[(rows - top) ** 2 + (columns - left) ** 2 < size ** 2 / 2] = cls
    image = COLOURS[labels] + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


def write_seg_dataset(root: Path, seed: int = 0) -> Path:
    """train_list.txt and val_list.txt under ``root`` with the images (.jpg) and annotations (.png) they list."""
    rng = np.random.default_rng(seed)
    for split, sizes in (('train', TRAIN_SIZES), ('val', VAL_SIZES)):
        lines = []
        for index, (height, width) in enumerate(sizes):
            image, labels = draw(height, width, rng)
            stem = f'{split}_{index}'
            Image.fromarray(image).save(root / f'{stem}.jpg', quality=95)
            Image.fromarray(labels, mode='L').save(root / f'{stem}.png')
            lines.append(f'{stem}.jpg {stem}.png')
        (root / f'{split}_list.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return root
