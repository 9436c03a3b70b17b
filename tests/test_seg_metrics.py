"""seg_metrics against mmseg 0.11's definitions restated through a confusion matrix: intersection, union,
predicted and labelled pixels summed over the set (ignore index 255 excluded), mIoU and mAcc as nan-means over
classes, aAcc; counts that add up over shards of the set (what makes 1 and 2 processes agree)."""
import json

import numpy as np
import paddle
import pytest

import seg_metrics as sm
from datasets import ShardedEvalBatchSampler
from errors import BadInputError

NUM_CLASSES = 6
IGNORE = 255


def random_set(num_images: int = 7, seed: int = 0):
    """Predictions and labels of different sizes: label class 4 never occurs (predicted sometimes: IoU 0, accuracy
    NaN), class 5 occurs nowhere (NaN, skipped); about 1/5 of the labels are ignored."""
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(num_images):
        shape = tuple(rng.integers(5, 40, size=2))
        label = rng.choice([0, 1, 2, 3], size=shape).astype(np.uint8)
        label[rng.random(shape) < 0.2] = IGNORE
        pred = np.where(rng.random(shape) < 0.6, label, rng.choice([0, 1, 2, 3, 4], size=shape)).astype(np.int64)
        pred[label == IGNORE] = rng.choice([0, 1, 4], size=int((label == IGNORE).sum()))
        preds.append(pred)
        labels.append(label)
    return preds, labels


def confusion(preds, labels) -> np.ndarray:
    """[label class, predicted class] pixel counts over the pixels whose label is not ignored."""
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES))
    for pred, label in zip(preds, labels):
        kept = label != IGNORE
        np.add.at(matrix, (label[kept].astype(int), pred[kept]), 1)
    return matrix


def reference_metrics(preds, labels) -> dict:
    """mmseg's metrics from the confusion matrix: IoU = diagonal / (row + column - diagonal), accuracy =
    diagonal / row, 0/0 = NaN; mIoU and mAcc skip NaN; aAcc = trace / total."""
    matrix = confusion(preds, labels)
    diagonal, rows, columns = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = diagonal / (rows + columns - diagonal)
        acc = diagonal / rows
    return {'miou': np.nanmean(iou), 'macc': np.nanmean(acc), 'aacc': diagonal.sum() / matrix.sum(), 'iou': iou,
            'acc': acc, 'counts': np.concatenate([diagonal, rows + columns - diagonal, columns, rows])}


def set_counts(preds, labels) -> np.ndarray:
    """The device counts (what the task all-reduces), summed image by image."""
    return sum(sm.pixel_counts(paddle.to_tensor(pred), paddle.to_tensor(label.astype(np.int64)), NUM_CLASSES,
                               IGNORE).numpy() for pred, label in zip(preds, labels, strict=True))


def test_metrics_equal_the_confusion_matrix_reference():
    preds, labels = random_set()
    counts = set_counts(preds, labels)
    expected = reference_metrics(preds, labels)
    np.testing.assert_array_equal(counts, expected['counts'])
    result = sm.summarise(counts)
    for key in ('miou', 'macc', 'aacc'):
        assert result[key] == pytest.approx(expected[key], rel=1e-12)
    np.testing.assert_allclose(np.array(result['iou'], float), expected['iou'], rtol=1e-12)  # None -> NaN
    np.testing.assert_allclose(np.array(result['acc'], float), expected['acc'], rtol=1e-12)
    assert result['num_pixels'] == sum(int((label != IGNORE).sum()) for label in labels)


def test_absent_classes_are_nan_and_skipped():
    preds, labels = random_set()
    result = sm.summarise(set_counts(preds, labels))
    assert result['iou'][5] is None and result['acc'][5] is None  # in no label, in no prediction
    assert result['iou'][4] == 0.0 and result['acc'][4] is None  # predicted, never labelled
    assert result['miou'] == pytest.approx(np.mean(result['iou'][:5]), rel=1e-12)
    assert result['macc'] == pytest.approx(np.mean(result['acc'][:4]), rel=1e-12)
    json.dumps({key: value for key, value in result.items() if key != 'table'}, allow_nan=False)  # metrics.jsonl
    assert result['table'].splitlines()[6].split()[-2:] == ['nan', 'nan']


def test_ignored_pixels_count_nowhere_whatever_is_predicted_there():
    preds, labels = random_set(num_images=3)
    changed = [np.where(label == IGNORE, 3, pred) for pred, label in zip(preds, labels)]
    np.testing.assert_array_equal(set_counts(changed, labels), set_counts(preds, labels))
    all_ignored = sm.intersect_and_union(np.zeros((4, 4)), np.full((4, 4), IGNORE), num_classes=NUM_CLASSES)
    assert not all_ignored.any()


def test_predictions_outside_the_classes_fall_in_no_bin():
    label = np.array([[0, 1], [2, 3]])
    counts = sm.intersect_and_union(np.array([[0, 9], [-1, 3]]), label, num_classes=4).reshape(4, 4)
    np.testing.assert_array_equal(counts[0], [1, 0, 0, 1])  # intersection
    np.testing.assert_array_equal(counts[2], [1, 0, 0, 1])  # predicted
    np.testing.assert_array_equal(counts[3], [1, 1, 1, 1])  # labelled


def counts_of_rank(preds, labels, rank: int, world_size: int, batch_size: int = 2) -> np.ndarray:
    """One process's evaluation: its shard from the project's eval sampler, batch by batch (engine.evaluate)."""
    total = np.zeros(sm.num_counts(NUM_CLASSES))
    for batch in ShardedEvalBatchSampler(len(preds), batch_size, rank, world_size):
        total += set_counts([preds[i] for i in batch], [labels[i] for i in batch])
    return total


def test_counts_of_two_processes_add_up_to_those_of_one():
    """7 images of different sizes: one process, or two (shards of 3 and 4) whose counts the engine's all-reduce
    adds: the same integer sums in either order, hence the same metrics."""
    preds, labels = random_set(num_images=7, seed=3)
    one = counts_of_rank(preds, labels, 0, 1)
    two = [counts_of_rank(preds, labels, rank, 2) for rank in range(2)]
    assert [len(ShardedEvalBatchSampler(7, 1, rank, 2).indices) for rank in range(2)] == [3, 4]
    np.testing.assert_array_equal(one, set_counts(preds, labels))
    np.testing.assert_array_equal(two[0] + two[1], one)
    np.testing.assert_array_equal(two[1] + two[0], one)
    assert sm.summarise(two[0] + two[1]) == sm.summarise(one)
    halves = set_counts(preds[:3], labels[:3]) + set_counts(preds[3:], labels[3:])
    np.testing.assert_array_equal(halves, one)


def test_device_counts_equal_intersect_and_union_in_float64():
    preds, labels = random_set(num_images=2)
    for pred, label in zip(preds, labels, strict=True):
        counts = sm.pixel_counts(paddle.to_tensor(pred), paddle.to_tensor(label.astype(np.int64)), NUM_CLASSES, IGNORE)
        assert counts.dtype == paddle.float64 and counts.shape == [sm.num_counts(NUM_CLASSES)]
        np.testing.assert_array_equal(counts.numpy(), sm.intersect_and_union(pred, label, num_classes=NUM_CLASSES,
                                                                             ignore_index=IGNORE))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r'prediction of shape \(3, 4\) for a label map of shape \(4, 3\)'):
        sm.intersect_and_union(np.zeros((3, 4)), np.zeros((4, 3)), num_classes=2)
    with pytest.raises(ValueError, match='cannot be split'):
        sm.summarise(np.zeros(10))
    with pytest.raises(ValueError, match='3 class names for counts of 6 classes'):
        sm.summarise(np.zeros(24), ['a', 'b', 'c'])


def test_ade20k_class_names_and_table():
    names = sm.read_class_names()
    assert len(names) == 150 == len(set(names))
    assert names[:3] == ['wall', 'building', 'sky'] and names[7] == 'bed' and names[-1] == 'flag'
    counts = np.zeros(sm.num_counts(150))
    counts[0], counts[150], counts[450] = 3, 4, 4  # wall: 3 of 4 labelled pixels, union 4
    result = sm.summarise(counts, names)
    lines = result['table'].splitlines()
    assert len(lines) == 151
    assert lines[1].split() == ['0', 'wall', '75.00', '75.00']
    assert lines[45].split() == ['44', 'chest', 'of', 'drawers', 'nan', 'nan']
    assert result['miou'] == result['macc'] == result['aacc'] == 0.75


def test_bad_class_name_files_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / 'names.txt'
    path.write_text('wall\n\nsky\n', encoding='utf-8')
    with pytest.raises(BadInputError, match=r'names.txt:2: empty class name'):
        sm.read_class_names(path)
    with pytest.raises(BadInputError, match='missing.txt: cannot read'):
        sm.read_class_names(tmp_path / 'missing.txt')
