"""Loss curves of a run and the curves its task declares (tasks.Curve: fine-tuning's top-1, pre-training's MLM
accuracy, ...), from its metrics.jsonl, as a PNG; for a linear-probing run also the val top-1 of each probed block at
its last evaluation.

    python plot_metrics.py -output ./output        # writes ./output/curves.png (and blocks.png)
    python plot_metrics.py -output ./probe_a -compare ./probe_b   # blocks.png: both runs' blocks, one line each
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import sys
import warnings

import matplotlib

matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt

from errors import EXIT_BAD_INPUT, BadInputError

with warnings.catch_warnings():  # tasks.py imports Paddle, which warns that no ccache is installed: not news here
    warnings.simplefilter('ignore')
    from tasks import Curve, Task

TASK_FOLDER = os.path.dirname(os.path.abspath(__file__))


class MetricsError(BadInputError):
    """A metrics file that is missing or malformed; the message names the file (and the line)."""


def read_metrics(path: str) -> list:
    """The records of metrics.jsonl; a malformed line is an error naming its number."""
    if not os.path.isfile(path):
        raise MetricsError(f'no metrics file: {path}')
    records = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise MetricsError(f'{path}: line {number} is not JSON ({err})') from err
    return records


def series(records: list, split: str, key: str) -> tuple:
    """(epochs, values) of one metric of one split, in the order written (a resumed run continues the list)."""
    points = [(r['epoch'], r[key]) for r in records if r.get('split') == split and key in r]
    return tuple(zip(*points)) if points else ((), ())


LOSS_CURVES = (Curve('train', 'loss', 'train'), Curve('val', 'loss', 'val'))  # every objective reports its loss
EMA_PREFIX = 'ema_'  # job.py records the EMA's evaluation as ema_<key> of every logged key


def find_tasks(folder: str | None = None) -> dict:
    """{name: Task} of every Task in the task_*.py modules of ``folder`` (this script's, which is on the path): a
    new task's module declares its curves and nothing here changes. Importing them imports Paddle."""
    names = sorted(info.name for info in pkgutil.iter_modules([folder or TASK_FOLDER]) if info.name.startswith('task_'))
    modules = [importlib.import_module(name) for name in names]
    return {task.name: task for module in modules for task in vars(module).values() if isinstance(task, Task)}


def tasks_of(records: list, known: dict) -> list:
    """The tasks whose curves to draw: those the records name (Task.metrics_record), and for records without a
    known name (older runs) every known task one of whose curves they hold."""
    named = {record.get('task') for record in records} & known.keys()
    unnamed = [record for record in records if record.get('task') not in known]
    inferred = {name for name, task in known.items()
                if any(series(unnamed, curve.split, curve.key)[0] for curve in task.curves)}
    return [task for name, task in known.items() if name in named | inferred]


def with_ema(curves) -> list:
    """``curves``, each val curve followed by its EMA twin."""
    return [twin for curve in curves for twin in
            (curve, *([Curve(curve.split, EMA_PREFIX + curve.key, f'{curve.label} EMA', curve.percent)]
                      if curve.split == 'val' else []))]


def curves_to_draw(records: list, tasks: list) -> tuple:
    """(loss curves, the tasks' curves) that the records hold, in declaration order, each once."""
    declared = with_ema(dict.fromkeys(curve for task in tasks for curve in task.curves))
    return tuple([curve for curve in curves if series(records, curve.split, curve.key)[0]]
                 for curves in (with_ema(LOSS_CURVES), declared))


def plot_curves(records: list, png_path: str, tasks: list) -> None:
    """The losses (left) and the curves ``tasks`` declare (right) of a run's records."""
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_curves, metric_curves = curves_to_draw(records, tasks)
    for axes, curves in ((loss_axes, loss_curves), (metric_axes, metric_curves)):
        for curve in curves:
            epochs, values = series(records, curve.split, curve.key)
            axes.plot(epochs, [100 * v for v in values] if curve.percent else values, marker='.', label=curve.label)
    loss_axes.set(xlabel='epoch', ylabel='loss', title='loss')
    percent = metric_curves and all(curve.percent for curve in metric_curves)
    metric_axes.set(xlabel='epoch', ylabel='%' if percent else 'value',
                    title=', '.join(task.name for task in tasks) or 'no declared curves')
    for axes in (loss_axes, metric_axes):
        axes.xaxis.get_major_locator().set_params(integer=True)  # epochs: no 2.5
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


BLOCK_ACCURACY = re.compile(r'^acc1_block(\d+)$')  # a linear-probing run's per-block val top-1 (task_linprobe.py)


def block_accuracies(records: list) -> tuple:
    """(epoch, blocks, top-1 of each) of the last evaluation that has per-block accuracies; (None, (), ()) if
    none does (not a linear-probing run)."""
    for record in reversed(records):
        found = sorted((int(match.group(1)), value) for key, value in record.items()
                       if record.get('split') == 'val' and (match := BLOCK_ACCURACY.match(key)))
        if found:
            blocks, values = zip(*found)
            return record['epoch'], blocks, values
    return None, (), ()


def plot_block_accuracy(runs: dict, png_path: str) -> None:
    """Val top-1 per probed block, one line per run ({label: records}), from each run's last evaluation."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, records in runs.items():
        epoch, blocks, values = block_accuracies(records)
        axes.plot(blocks, [100 * v for v in values], marker='o', label=f'{label} (epoch {epoch})')
    axes.set(xlabel='block (0 = first)', ylabel='val top-1 (%)', title='linear probe accuracy per block', ylim=(0, 100))
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def read_runs(folders: list) -> dict:
    """{label: records} of each run folder's metrics.jsonl; the label is the folder's name, or its whole path where
    two folders share a name."""
    names = [os.path.basename(os.path.normpath(folder)) for folder in folders]
    return {name if names.count(name) == 1 else os.path.normpath(folder):
            read_metrics(os.path.join(folder, 'metrics.jsonl')) for name, folder in zip(names, folders)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Plot a run\'s loss and accuracy curves')
    parser.add_argument('-output', required=True, help='the run folder holding metrics.jsonl')
    parser.add_argument('-compare', nargs='+', default=[], metavar='FOLDER',
                        help='other linear-probing runs to draw in blocks.png')
    args = parser.parse_args(argv)
    try:
        runs = read_runs([args.output, *args.compare])
    except MetricsError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    records = next(iter(runs.values()))
    unprobed = [label for label, run in runs.items() if block_accuracies(run)[0] is None]
    if args.compare and unprobed:
        print(f'error: -compare draws linear-probing runs; no per-block accuracy in {", ".join(unprobed)}',
              file=sys.stderr)
        return EXIT_BAD_INPUT
    written = [os.path.join(args.output, 'curves.png')]
    plot_curves(records, written[0], tasks_of(records, find_tasks()))
    if not unprobed:
        written.append(os.path.join(args.output, 'blocks.png'))
        plot_block_accuracy(runs, written[1])
    print(f'wrote {", ".join(written)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
