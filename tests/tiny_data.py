"""A small ImageNet-style list-file dataset for engine tests: 32 px PNGs in 10 colour-coded classes, learnable
in a few epochs by the tiny BEiT."""
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 10


def class_colour(label: int) -> np.ndarray:
    return np.array([label * 25, 255 - label * 25, (label * 77) % 256], dtype=np.float64) * 0.75


def write_split(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        label = index % NUM_CLASSES
        noise = rng.integers(0, 64, (32, 32, 3))
        Image.fromarray(np.clip(noise + class_colour(label), 0, 255).astype(np.uint8)).save(
            root / split / f'{index}.png')
        lines.append(f'{split}/{index}.png {label}\n')
    (root / f'{split}_list.txt').write_text(''.join(lines))


def write_dataset(root: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    write_split(root, 'train', num_train, rng)
    write_split(root, 'val', num_val, rng)
    return root
