"""Semantic segmentation data: (image, label map) pairs, checked before training, loaded with mmseg's semantics.

Layouts (SEG.DATASET):

- ``ade20k``, mmseg's: ``DATA_PATH/images/{training,validation}/**/*.jpg`` with the annotation of the same
  relative path and stem at ``DATA_PATH/annotations/{training,validation}/**/*.png`` (annotations without an
  image are not used, as in mmseg).
- ``list``: ``DATA_PATH/train_list.txt`` and ``val_list.txt``, one ``image_path label_path`` per line, relative to
  DATA_PATH or absolute. When a line holds a tab, the tab (or a run of tabs) separates the two paths and either may
  contain spaces; otherwise the paths are separated by whitespace and neither may contain it (a line with more than
  two fields and no tab is refused). Blank lines, ``#`` comments and line numbers as in sample_sources.py.

Checks before training, all entries at once, reported in one DatasetError that names the list line or file: a
missing or unreadable image or annotation, an annotation that is not a single-channel label image, an annotation
whose size differs from its image's (headers only: nothing is decoded), and with SEG.CHECK_LABEL_VALUES label
values outside [0, SEG.NUM_CLASSES) other than SEG.IGNORE_INDEX (every annotation is decoded). With
SEG.REDUCE_ZERO_LABEL (ADE20K) the raw values allowed are 0..NUM_CLASSES and 255. Loading checks the values of
each annotation again, always, and raises a DatasetError naming the file, its list line and the values found.

The checked pairs are a sample_table.SampleTable whose path field is ``image\\0annotation`` (NUL cannot occur in a
POSIX path), so the processes of a run share one checked copy exactly as classification does (checked_once).
"""
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from paddle.io import Dataset
from PIL import Image

from config import ConfigError, named_origin
from image_files import DECODE_ERRORS, load_rgb_image
from sample_sources import MAX_REPORTED_PROBLEMS, DatasetError, data_root, numbered_entries
from sample_table import SampleTable, checked_once
from seg_transforms import get_seg_train_transforms, get_seg_val_transforms
from utils import derived_seed

SEG_DATASETS = ('ade20k', 'list')
ADE20K_SPLITS = {'train': 'training', 'val': 'validation'}
IMAGE_SUFFIX, ANNOTATION_SUFFIX = '.jpg', '.png'  # mmseg's ADE20KDataset
LABEL_MODES = ('1', 'L', 'P', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'I')  # PIL modes of single-channel label images
_SEPARATOR = '\0'
_TABS = re.compile(r'\t+')


class SegSample(NamedTuple):
    image: str
    annotation: str
    line: int = 0  # line in the list file; 0 for a pair found in the ADE20K folders


class SegPairs(Sequence):
    """The checked pairs of a split: a SampleTable of ``image\\0annotation`` paths (shared between processes)."""

    def __init__(self, table: SampleTable):
        self.table = table

    @classmethod
    def from_entries(cls, root: str, entries: Sequence[tuple[int, str, str]]) -> 'SegPairs':
        """From (list line, image path, annotation path), paths relative to ``root`` or absolute."""
        return cls(SampleTable.from_entries(root, [(line, f'{image}{_SEPARATOR}{annotation}', 0)
                                                   for line, image, annotation in entries]))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> SegSample:
        sample = self.table[index]
        image, annotation = sample.path.split(_SEPARATOR)
        return SegSample(image, os.path.join(self.table.root, annotation), sample.line)


class LabelRule(NamedTuple):
    """Which raw annotation values are labels: [0, num_classes) and ignore_index, or with ``reduce_zero_label``
    0..num_classes and 255 (mmseg's LoadAnnotations: 0 -> 255, v -> v - 1, 255 stays 255)."""
    num_classes: int
    ignore_index: int
    reduce_zero_label: bool

    @classmethod
    def from_config(cls, config) -> 'LabelRule':
        return cls(config.SEG.NUM_CLASSES, config.SEG.IGNORE_INDEX, config.SEG.REDUCE_ZERO_LABEL)

    def allowed(self, values: np.ndarray) -> np.ndarray:
        if self.reduce_zero_label:
            return ((values >= 0) & (values <= self.num_classes)) | (values == 255)
        return ((values >= 0) & (values < self.num_classes)) | (values == self.ignore_index)

    def bad_values(self, raw: np.ndarray) -> list[int]:
        """The distinct raw values of ``raw`` that are not allowed, ascending (comparisons on the whole map, then
        the rare offenders sorted: 20k ADE20K annotations are checked before training)."""
        bad = ~self.allowed(raw)
        return np.unique(raw[bad]).tolist() if bad.any() else []

    def describe(self) -> str:
        if self.reduce_zero_label:
            return (f'raw values must be 0..{self.num_classes} or 255 (SEG.REDUCE_ZERO_LABEL maps 0 to 255 and v to '
                    f'v - 1; SEG.NUM_CLASSES {self.num_classes})')
        return (f'values must lie in [0, {self.num_classes}) (SEG.NUM_CLASSES) or be SEG.IGNORE_INDEX '
                f'{self.ignore_index}')

    def values_problem(self, raw: np.ndarray) -> str:
        """'' or what is wrong with the values of ``raw``."""
        bad = self.bad_values(raw)
        if not bad:
            return ''
        shown = ', '.join(map(str, bad[:10])) + (', ...' if len(bad) > 10 else '')
        return f'label values {shown} found; {self.describe()}'

    def labels(self, raw: np.ndarray) -> np.ndarray:
        """uint8 labels of checked raw values."""
        labels = raw.astype(np.uint8)
        if self.reduce_zero_label:
            labels = labels - np.uint8(1)  # uint8 wraps: 0 -> 255; 255 -> 254, put back to 255
            labels[labels == 254] = 255
        return labels


def _mode_problem(path: str, mode: str) -> str:
    if mode in LABEL_MODES:
        return ''
    return f'{path}: an annotation must be a single-channel label image (PIL mode L or P), got mode {mode}'


def read_annotation(path: str) -> np.ndarray:
    """The raw values of a label image, as mmseg reads them with PIL (palette indices for mode P)."""
    with Image.open(path) as img:
        problem = _mode_problem(path, img.mode)
        if problem:
            raise DatasetError(problem)
        img.load()
        return np.asarray(img).astype(np.uint8 if img.mode in ('1', 'L', 'P') else np.int64)


# ---- where the pairs come from ----------------------------------------------------------------------------------


def _list_pairs(list_path: str) -> tuple[list, list]:
    """([(line, image, annotation)], [(line, problem text)]) of a pair list file."""
    entries, problems = [], []
    for number, text in numbered_entries(list_path):
        fields = [field.strip() for field in _TABS.split(text)] if '\t' in text else text.split()
        if len(fields) == 2 and all(fields):
            entries.append((number, *fields))
        else:
            problems.append((number, f'line {number}: expected "image_path label_path" (a tab between them when a '
                                     f'path holds spaces), got {text!r}'))
    return entries, problems


def _ade20k_pairs(root: str, split: str) -> list[tuple[int, str, str]]:
    """[(0, image, annotation)], relative to ``root``, of mmseg's ADE20K layout."""
    image_folder = os.path.join(root, 'images', split)
    if not os.path.isdir(image_folder):
        raise DatasetError(f'ADE20K image folder not found: {image_folder} (SEG.DATASET ade20k expects '
                           f'DATA_PATH/images/{split} and DATA_PATH/annotations/{split})')
    entries = []
    for parent, subfolders, names in os.walk(image_folder, followlinks=True):
        subfolders.sort()
        for name in sorted(names):
            if name.endswith(IMAGE_SUFFIX):
                relative = os.path.relpath(os.path.join(parent, name), image_folder)
                stem = relative[:-len(IMAGE_SUFFIX)]
                entries.append((0, os.path.join('images', split, relative),
                                os.path.join('annotations', split, stem + ANNOTATION_SUFFIX)))
    return entries


def _header(path: str) -> tuple[tuple[int, int] | None, str, str]:
    """(size, mode, problem) from a file's header; nothing is decoded."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode, ''
    except FileNotFoundError:
        return None, '', f'file not found: {path}'
    except DECODE_ERRORS as err:
        return None, '', f'cannot read {path}: {err}'


def _pair_problem(root: str, image: str, annotation: str, rule: LabelRule | None) -> str:
    """'' or what is wrong with one pair; ``rule`` None skips the label values."""
    image_path, annotation_path = os.path.join(root, image), os.path.join(root, annotation)
    image_size, _, problem = _header(image_path)
    if problem:
        return problem
    annotation_size, mode, problem = _header(annotation_path)
    if problem:
        return f'annotation {problem}' if problem.startswith('file not found') else problem
    problem = _mode_problem(annotation_path, mode)
    if problem:
        return problem
    if annotation_size != image_size:
        return (f'{annotation_path} is {annotation_size[0]}x{annotation_size[1]} but its image {image_path} is '
                f'{image_size[0]}x{image_size[1]} (width x height)')
    if rule is None:
        return ''
    try:
        problem = rule.values_problem(read_annotation(annotation_path))
    except DECODE_ERRORS as err:
        return f'cannot decode {annotation_path}: {err}'
    return f'{annotation_path}: {problem}' if problem else ''


def _check_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def check_pairs(source: str, root: str, entries: list, problems: list, rule: LabelRule | None) -> SegPairs:
    """The pairs of ``entries`` (line, image, annotation), or one DatasetError listing every unusable one (list
    lines by number, ADE20K pairs by file) with ``problems`` found earlier. The files are read on one thread per
    core."""
    good = []
    with ThreadPoolExecutor(_check_threads()) as pool:  # PIL decodes with the GIL released
        found = pool.map(lambda entry: _pair_problem(root, entry[1], entry[2], rule), entries)
    for (line, image, annotation), problem in zip(entries, found):
        if problem:
            problems.append((line, f'line {line}: {problem}' if line else problem))
        else:
            good.append((line, image, annotation))
    if problems:
        shown = [text for _, text in sorted(problems)[:MAX_REPORTED_PROBLEMS]]
        raise DatasetError(f'{source}: {len(problems)} of {len(problems) + len(good)} pairs are unusable; the first '
                           f'{len(shown)}:\n  ' + '\n  '.join(shown))
    if not good:
        raise DatasetError(f'{source}: no image and annotation pairs')
    return SegPairs.from_entries(root, good)


def checked_pairs(config, mode: str) -> tuple[SegPairs, str]:
    """The checked pairs of ``mode`` ('train' or 'val') in ``config``'s data and where they were listed; under
    sample_table's SAMPLE_TABLES_ENV the first process of a run checks them and the others map its table."""
    if mode not in ADE20K_SPLITS:
        raise ValueError(f'mode must be one of {list(ADE20K_SPLITS)}, got {mode!r}')
    validate_seg_data_config(config)
    root = data_root(config)
    rule = LabelRule.from_config(config) if config.SEG.CHECK_LABEL_VALUES else None
    if config.SEG.DATASET == 'list':
        source = os.path.join(root, f'{mode}_list.txt')

        def check() -> SampleTable:
            return check_pairs(source, root, *_list_pairs(source), rule).table
    else:
        source = os.path.join(root, 'images', ADE20K_SPLITS[mode])

        def check() -> SampleTable:
            return check_pairs(source, root, _ade20k_pairs(root, ADE20K_SPLITS[mode]), [], rule).table
    return SegPairs(checked_once(source, config.SEG.NUM_CLASSES, check)), source


# ---- the dataset ------------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """(image, int64 label map) samples: ``transform(uint8 RGB HWC image, uint8 HW labels, rng)``'s output.

    ``rng`` is a numpy RandomState seeded from (the ``reseed`` seed, index) as classification seeds its samples
    (utils.derived_seed), so a sample does not depend on which loader worker, or none, loads it; before any
    ``reseed`` numpy's global generator is used. A file that does not decode, an image whose size differs from its
    annotation's, or label values outside the rule raise a DatasetError naming the file and its list line
    (DATA.BAD_IMAGE_POLICY 'skip' does not apply: a pair cannot be replaced by another). Evaluation samples keep
    their own sizes, so datasets.get_dataloader's stacking collate needs DATA.BATCH_SIZE_EVAL 1 for them.
    """

    on_device = None  # the images are normalised on the host (seg_transforms.py says why)
    bad_images = 0  # what job.py records of replaced samples: a pair is never replaced (a bad one stops the run)

    def __init__(self, pairs: Sequence[SegSample], transform, rule: LabelRule, source: str = '', *,
                 sample_nbytes: int | None = None):
        if not pairs:
            raise DatasetError(f'{source or "dataset"}: no samples')
        self.pairs, self.transform, self.rule, self.source = pairs, transform, rule, source
        self.sample_nbytes = sample_nbytes
        self.seed = None

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return len(self.pairs)

    def rng(self, index: int):
        return np.random if self.seed is None else np.random.RandomState(derived_seed(self.seed, index))

    def _describe(self, path: str, line: int) -> str:
        return f'{path} ({self.source} line {line})' if line else path

    def _decode(self, read, path: str, line: int):
        try:
            return read(path)
        except DatasetError as err:  # before DECODE_ERRORS, which holds its base ValueError
            raise DatasetError(f'{err} ({self.source} line {line})' if line else str(err)) from err
        except DECODE_ERRORS as err:
            raise DatasetError(f'cannot decode {self._describe(path, line)}: {err}') from err

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``index`` decoded: uint8 RGB HWC image, uint8 HW labels (reduce_zero_label applied)."""
        pair = self.pairs[index]
        raw = self._decode(read_annotation, pair.annotation, pair.line)
        image = np.asarray(self._decode(load_rgb_image, pair.image, pair.line))
        problem = self.rule.values_problem(raw)
        if problem:
            raise DatasetError(f'{self._describe(pair.annotation, pair.line)}: {problem}')
        if raw.shape != image.shape[:2]:
            raise DatasetError(f'{self._describe(pair.annotation, pair.line)} is {raw.shape[1]}x{raw.shape[0]} but its '
                               f'image {pair.image} is {image.shape[1]}x{image.shape[0]} (width x height)')
        return image, self.rule.labels(raw)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.load(index)
        return self.transform(image, labels, self.rng(index))


def get_seg_dataset(config, mode: str) -> SegmentationDataset:
    """The checked train or val split of ``config`` with its mmseg pipeline (seg_transforms.py)."""
    pairs, source = checked_pairs(config, mode)
    if mode == 'train':
        size = config.DATA.IMAGE_SIZE
        return SegmentationDataset(pairs, get_seg_train_transforms(config), LabelRule.from_config(config), source,
                                   sample_nbytes=size * size * (3 * 4 + 8))  # float32 CHW image, int64 labels
    return SegmentationDataset(pairs, get_seg_val_transforms(config), LabelRule.from_config(config), source)


def _config_error(config, keys: Sequence[str], message: str) -> ConfigError:
    return ConfigError(named_origin(config, *keys) + message)


def _range_ok(values, low_bound: float) -> bool:
    return len(values) == 2 and low_bound <= values[0] <= values[1]


def validate_seg_data_config(config) -> None:
    """The SEG data keys that config.py's type checks let through but the pipeline cannot use: ConfigError naming
    the key and where its value came from."""
    seg = config.SEG
    checks = (
        (['SEG.DATASET'], seg.DATASET in SEG_DATASETS,
         f'SEG.DATASET must be one of {list(SEG_DATASETS)}, got {seg.DATASET!r}'),
        (['SEG.NUM_CLASSES'], 0 < seg.NUM_CLASSES <= 255,
         f'SEG.NUM_CLASSES must lie in [1, 255] (labels are uint8), got {seg.NUM_CLASSES}'),
        (['SEG.IGNORE_INDEX', 'SEG.NUM_CLASSES'], seg.NUM_CLASSES <= seg.IGNORE_INDEX <= 255,
         f'SEG.IGNORE_INDEX {seg.IGNORE_INDEX} must lie in [SEG.NUM_CLASSES, 255] (it cannot be a class)'),
        (['SEG.IGNORE_INDEX', 'SEG.REDUCE_ZERO_LABEL'], not seg.REDUCE_ZERO_LABEL or seg.IGNORE_INDEX == 255,
         'SEG.REDUCE_ZERO_LABEL maps raw 0 to 255 as mmseg does, so SEG.IGNORE_INDEX must be 255'),
        (['SEG.IMG_SCALE'], len(seg.IMG_SCALE) == 2 and all(isinstance(v, int) and v > 0 for v in seg.IMG_SCALE),
         f'SEG.IMG_SCALE needs two positive integers (long, short), got {list(seg.IMG_SCALE)}'),
        (['SEG.RATIO_RANGE'], _range_ok(seg.RATIO_RANGE, 1e-9),
         f'SEG.RATIO_RANGE needs [min, max] with 0 < min <= max, got {list(seg.RATIO_RANGE)}'),
        (['SEG.CAT_MAX_RATIO'], 0 < seg.CAT_MAX_RATIO <= 1,
         f'SEG.CAT_MAX_RATIO must lie in (0, 1] (1 turns the check off), got {seg.CAT_MAX_RATIO}'),
        (['SEG.FLIP_PROB'], 0 <= seg.FLIP_PROB <= 1, f'SEG.FLIP_PROB must lie in [0, 1], got {seg.FLIP_PROB}'),
        (['SEG.BRIGHTNESS_DELTA'], seg.BRIGHTNESS_DELTA >= 0,
         f'SEG.BRIGHTNESS_DELTA must not be negative, got {seg.BRIGHTNESS_DELTA}'),
        (['SEG.CONTRAST_RANGE'], _range_ok(seg.CONTRAST_RANGE, 0),
         f'SEG.CONTRAST_RANGE needs [low, high] with 0 <= low <= high, got {list(seg.CONTRAST_RANGE)}'),
        (['SEG.SATURATION_RANGE'], _range_ok(seg.SATURATION_RANGE, 0),
         f'SEG.SATURATION_RANGE needs [low, high] with 0 <= low <= high, got {list(seg.SATURATION_RANGE)}'),
        (['SEG.HUE_DELTA'], 0 <= seg.HUE_DELTA < 180, f'SEG.HUE_DELTA must lie in [0, 180), got {seg.HUE_DELTA}'),
    )
    for keys, ok, message in checks:
        if not ok:
            raise _config_error(config, keys, message)
