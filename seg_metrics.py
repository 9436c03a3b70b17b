"""Semantic segmentation metrics as mmseg 0.11 computes them (mmseg/core/evaluation/metrics.py): per class, the
pixels where prediction and label agree (intersection), their union, the predicted and the labelled pixels, each
summed over the whole evaluation set before any ratio is taken; labels equal to the ignore index (255) count
nowhere, the prediction at those pixels included. mIoU and mAcc are nan-means over the classes, so a class that
neither the labels nor the predictions hold (0/0) is left out rather than counted as 0.

The four per-class sums travel as ONE float64 vector (``counts``): the engine adds such vectors over batches and
processes (engine.Objective, one all-reduce), so the metrics of a set split over processes are those of the whole
set. Pixel counts are integers, exact in float64 up to 2**53."""
from pathlib import Path

import numpy as np
import paddle

from errors import BadInputError

ADE20K_CLASSES_FILE = Path(__file__).resolve().parent / 'data' / 'ade20k_classes.txt'
COUNT_KINDS = ('intersection', 'union', 'predicted', 'labelled')


def num_counts(num_classes: int) -> int:
    """The length of the counts vector: intersection, union, predicted and labelled pixels of each class."""
    return len(COUNT_KINDS) * num_classes


def intersect_and_union(pred: np.ndarray, label: np.ndarray, *, num_classes: int,
                        ignore_index: int = 255) -> np.ndarray:
    """float64 [4 * num_classes]: one image's (or batch's) intersection, union, predicted and labelled pixels
    per class, over the pixels whose label is not ``ignore_index``. Class ids outside [0, num_classes) count in
    no bin (mmseg's histogram range)."""
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f'prediction of shape {pred.shape} for a label map of shape {label.shape}')
    kept = label != ignore_index
    pred = pred[kept].astype(np.int64)
    label = label[kept].astype(np.int64)
    intersection = _histogram(pred[pred == label], num_classes)
    predicted = _histogram(pred, num_classes)
    labelled = _histogram(label, num_classes)
    return np.concatenate([intersection, predicted + labelled - intersection, predicted, labelled])


def _histogram(values: np.ndarray, num_classes: int) -> np.ndarray:
    inside = values[(values >= 0) & (values < num_classes)]
    return np.bincount(inside, minlength=num_classes).astype(np.float64)


def pixel_counts(pred: paddle.Tensor, labels: paddle.Tensor, num_classes: int, ignore_index: int) -> paddle.Tensor:
    """float64 tensor [4 * num_classes]: intersect_and_union's counts of predicted maps ``pred`` (class ids, as
    argmax gives them) and label maps ``labels`` of the same shape, computed on the device for the engine's
    all-reduce: every ignored pixel goes to an extra bin that is dropped (labels are in [0, C) or ignore_index)."""
    valid = labels != ignore_index
    spare = paddle.full_like(labels, num_classes)

    def histogram(values: paddle.Tensor) -> paddle.Tensor:
        return paddle.bincount(values.flatten(), minlength=num_classes + 1)[:num_classes].astype('float64')

    intersection = histogram(paddle.where(valid & (pred == labels), pred, spare))
    predicted = histogram(paddle.where(valid, pred, spare))
    labelled = histogram(paddle.where(valid, labels, spare))
    return paddle.concat([intersection, predicted + labelled - intersection, predicted, labelled])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (mmseg's 0/0)."""
    with np.errstate(divide='ignore', invalid='ignore'):
        return numerator / denominator


def _nanmean(values: np.ndarray) -> float:
    """The mean over the non-NaN entries; NaN when every entry is NaN (no labelled or predicted pixel at all)."""
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float('nan')


def summarise(totals: np.ndarray, class_names=None) -> dict:
    """The metrics of summed counts: ``miou``, ``aacc`` (pixel accuracy), ``macc`` (mean class accuracy) as
    fractions; ``iou`` and ``acc`` per class as lists with None for a class without pixels (NaN, skipped by the
    means; None writes as JSON null); ``num_pixels`` (labelled, not ignored) and ``table``, the per-class text
    for the log."""
    totals = np.asarray(totals, np.float64)
    if totals.ndim != 1 or totals.size % len(COUNT_KINDS):
        raise ValueError(f'counts of {totals.shape} cannot be split into the {len(COUNT_KINDS)} per-class kinds '
                         f'{COUNT_KINDS}')
    intersection, union, _, labelled = totals.reshape(len(COUNT_KINDS), -1)
    iou = _ratio(intersection, union)
    acc = _ratio(intersection, labelled)
    num_pixels = labelled.sum()
    names = _class_names(class_names, iou.size)
    return {'miou': _nanmean(iou), 'aacc': float(intersection.sum() / num_pixels) if num_pixels else float('nan'),
            'macc': _nanmean(acc), 'iou': _listed(iou), 'acc': _listed(acc), 'num_pixels': int(num_pixels),
            'table': class_table(names, iou, acc)}


def _listed(values: np.ndarray) -> list:
    return [None if np.isnan(value) else float(value) for value in values]


def _class_names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(index) for index in range(num_classes)]
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f'{len(names)} class names for counts of {num_classes} classes')
    return names


def class_table(names, iou: np.ndarray, acc: np.ndarray) -> str:
    """One line per class: index, name, IoU and accuracy in percent with two decimals (mmseg's table), 'nan' for
    a class without pixels."""
    width = max([len('class'), *(len(name) for name in names)])
    lines = [f'{"":>4} {"class":<{width}} {"IoU":>6} {"Acc":>6}']
    for index, (name, class_iou, class_acc) in enumerate(zip(names, iou, acc)):
        lines.append(f'{index:>4} {name:<{width}} {100 * class_iou:>6.2f} {100 * class_acc:>6.2f}')
    return '\n'.join(lines)


def read_class_names(path: str | Path = ADE20K_CLASSES_FILE) -> list[str]:
    """Class names, one a line (line k names class k); a missing file or a blank line is refused, naming the file
    and line."""
    try:
        lines = Path(path).read_text(encoding='utf-8').splitlines()
    except OSError as err:
        raise BadInputError(f'{path}: cannot read the class names: {err}') from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise BadInputError(f'{path}:{number}: empty class name')
    return [line.strip() for line in lines]
