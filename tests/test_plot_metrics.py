"""plot_metrics.py: curves from metrics.jsonl, clear errors for missing or broken files."""
import json

from PIL import Image

import plot_metrics
from plot_metrics import block_accuracies, main, read_metrics, read_runs, series
from task_finetune import FINE_TUNING
from task_linprobe import LINEAR_PROBING
from task_pretrain import PRETRAINING
from task_segment import SEGMENTATION
from task_tokenizer import TOKENIZER_TRAINING

RECORDS = [
    {'split': 'train', 'epoch': 1, 'loss': 2.0, 'acc1': 0.3},
    {'split': 'val', 'epoch': 1, 'loss': 1.5, 'acc1': 0.5, 'ema_loss': 1.6, 'ema_acc1': 0.45},
    {'split': 'train', 'epoch': 2, 'loss': 1.0, 'acc1': 0.6},
    {'split': 'val', 'epoch': 2, 'loss': 0.9, 'acc1': 0.7, 'ema_loss': 1.0, 'ema_acc1': 0.65},
]


def write_metrics(folder, records=RECORDS, extra=''):
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records) + extra)


def test_series_picks_split_and_key(tmp_path):
    write_metrics(tmp_path)
    records = read_metrics(str(tmp_path / 'metrics.jsonl'))
    assert series(records, 'val', 'acc1') == ((1, 2), (0.5, 0.7))
    assert series(records, 'train', 'ema_acc1') == ((), ())


def test_writes_a_png(tmp_path, capsys):
    write_metrics(tmp_path)
    assert main(['-output', str(tmp_path)]) == 0
    with Image.open(tmp_path / 'curves.png') as png:
        assert png.format == 'PNG' and png.size == (1000, 400)
    assert 'curves.png' in capsys.readouterr().out


def test_missing_or_broken_metrics_are_named(tmp_path, capsys):
    assert main(['-output', str(tmp_path)]) == 2
    assert 'no metrics file' in capsys.readouterr().err
    write_metrics(tmp_path, extra='{"split": "val", \n')
    assert main(['-output', str(tmp_path)]) == 2
    assert 'line 5 is not JSON' in capsys.readouterr().err
    assert not (tmp_path / 'curves.png').exists()


PROBE_RECORDS = [
    {'split': 'train', 'epoch': 1, 'loss': 9.0, 'best_acc1': 0.3},
    {'split': 'val', 'epoch': 1, 'loss': 8.0, 'best_acc1': 0.4, 'best_block': 1, 'acc1_block0': 0.2,
     'acc1_block1': 0.4, 'acc5_block1': 0.9},
    {'split': 'val', 'epoch': 2, 'loss': 7.0, 'best_acc1': 0.6, 'best_block': 10, 'acc1_block2': 0.3,
     'acc1_block10': 0.6},
]


def test_block_accuracy_is_the_last_evaluations_in_block_order():
    assert block_accuracies(PROBE_RECORDS) == (2, (2, 10), (0.3, 0.6))
    assert block_accuracies(RECORDS) == (None, (), ())


def test_a_probing_run_also_gets_its_block_plot_and_compares_with_others(tmp_path, capsys):
    for name, records in (('pretrained', PROBE_RECORDS), ('random', PROBE_RECORDS[:2]), ('fine_tune', RECORDS)):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name, records)
    assert main(['-output', str(tmp_path / 'pretrained'), '-compare', str(tmp_path / 'random')]) == 0
    with Image.open(tmp_path / 'pretrained' / 'blocks.png') as png:
        assert png.format == 'PNG' and png.size == (600, 400)
    assert 'blocks.png' in capsys.readouterr().out
    assert main(['-output', str(tmp_path / 'fine_tune')]) == 0 and not (tmp_path / 'fine_tune' / 'blocks.png').exists()
    assert main(['-output', str(tmp_path / 'pretrained'), '-compare', str(tmp_path / 'fine_tune')]) == 2
    assert 'no per-block accuracy in fine_tune' in capsys.readouterr().err


def test_compared_runs_of_the_same_name_are_both_drawn(tmp_path):
    for parent in ('a', 'b'):
        (tmp_path / parent / 'probe').mkdir(parents=True)
        write_metrics(tmp_path / parent / 'probe', PROBE_RECORDS)
    runs = read_runs([str(tmp_path / 'a' / 'probe'), str(tmp_path / 'b' / 'probe')])
    assert list(runs) == [str(tmp_path / 'a' / 'probe'), str(tmp_path / 'b' / 'probe')]
    assert read_runs([str(tmp_path / 'a' / 'probe')]).keys() == {'probe'}


PRETRAINING_RECORDS = [{'split': 'train', 'epoch': epoch, 'loss': 9.0 - epoch, 'mlm_acc': 0.1 * epoch}
                       for epoch in (1, 2)]


def drawn_curves(monkeypatch, folder) -> list:
    """The lines of main's curves.png, [(label, epochs, values)] of each panel."""
    figures = []
    monkeypatch.setattr(plot_metrics.plt, 'close', figures.append)
    assert main(['-output', str(folder)]) == 0
    return [[(line.get_label(), list(line.get_xdata()), [round(y, 9) for y in line.get_ydata()])
             for line in axes.get_lines()] for axes in figures[0].axes]


def test_each_tasks_curves_are_those_it_always_had(tmp_path, monkeypatch):
    """Older runs' records (no task name): the loss panel, then the accuracy panel of each of the three tasks."""
    expected = {
        'fine_tune': [[('train', [1, 2], [2.0, 1.0]), ('val', [1, 2], [1.5, 0.9]), ('val EMA', [1, 2], [1.6, 1.0])],
                      [('train (mixed targets)', [1, 2], [30.0, 60.0]), ('val', [1, 2], [50.0, 70.0]),
                       ('val EMA', [1, 2], [45.0, 65.0])]],
        'pretrain': [[('train', [1, 2], [8.0, 7.0])], [('train MLM (masked patches)', [1, 2], [10.0, 20.0])]],
        'probe': [[('train', [1], [9.0]), ('val', [1, 2], [8.0, 7.0])],
                  [('val, best probed block', [1, 2], [40.0, 60.0])]],
    }
    for name, records in (('fine_tune', RECORDS), ('pretrain', PRETRAINING_RECORDS), ('probe', PROBE_RECORDS)):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name, records)
        assert drawn_curves(monkeypatch, tmp_path / name) == expected[name], name


STAND_IN_TASK = '''
from tasks import Curve, Task


def _unused(*args):
    raise AssertionError('plotting builds nothing of a task')


SEGMENTATION = Task('segmentation', _unused, _unused, _unused, _unused, _unused,
                    curves=(Curve('val', 'miou', 'val mIoU', percent=True), Curve('val', 'pixels', 'val pixels')))
'''


def test_a_new_tasks_declared_curves_are_drawn(tmp_path, monkeypatch):
    """A task module that plot_metrics.py has never heard of: its curves are drawn from its declaration alone."""
    (tmp_path / 'task_stand_in_segmentation.py').write_text(STAND_IN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plot_metrics, 'TASK_FOLDER', str(tmp_path))
    assert list(plot_metrics.find_tasks()) == ['segmentation']
    write_metrics(tmp_path, [{'task': 'segmentation', 'split': 'train', 'epoch': 1, 'loss': 3.0},
                             {'task': 'segmentation', 'split': 'val', 'epoch': 1, 'loss': 2.0, 'miou': 0.25,
                              'ema_miou': 0.125, 'pixels': 7, 'acc1': 0.5}])
    assert drawn_curves(monkeypatch, tmp_path) == [
        [('train', [1], [3.0]), ('val', [1], [2.0])],
        [('val mIoU', [1], [25.0]), ('val mIoU EMA', [1], [12.5]), ('val pixels', [1], [7])]]


def test_named_records_draw_their_tasks_curves_and_unnamed_ones_are_inferred():
    known = plot_metrics.find_tasks()
    assert set(known) == {FINE_TUNING.name, PRETRAINING.name, LINEAR_PROBING.name, SEGMENTATION.name,
                          TOKENIZER_TRAINING.name}
    named = [FINE_TUNING.metrics_record({**record, 'mlm_acc': 0.5}) for record in RECORDS]
    assert named[0] == {'task': 'fine-tuning', **RECORDS[0], 'mlm_acc': 0.5}
    assert plot_metrics.tasks_of(named, known) == [FINE_TUNING]  # mlm_acc is not fine-tuning's: not drawn
    assert [curve.key for curve in plot_metrics.curves_to_draw(named, [FINE_TUNING])[1]] == ['acc1', 'acc1',
                                                                                            'ema_acc1']
    unknown = [{**record, 'task': 'a task of another checkout'} for record in PRETRAINING_RECORDS]
    assert plot_metrics.tasks_of(unknown, known) == [PRETRAINING]
    resumed = PROBE_RECORDS[:1] + [LINEAR_PROBING.metrics_record(record) for record in PROBE_RECORDS[1:]]
    assert plot_metrics.tasks_of(resumed, known) == [LINEAR_PROBING]
    assert plot_metrics.tasks_of([{'split': 'train', 'epoch': 1, 'loss': 1.0}], known) == []
