"""Loss and accuracy curves of a run (fine-tuning, or pre-training's MLM accuracy), from its metrics.jsonl, as a PNG.

    python plot_metrics.py -output ./output        # writes ./output/curves.png
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use('Agg')  # files only, no display needed
import matplotlib.pyplot as plt


def read_metrics(path: str) -> list:
    """The records of metrics.jsonl; a malformed line is an error naming its number."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no metrics file: {path}')
    records = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f'{path}: line {number} is not JSON ({err})') from err
    return records


def series(records: list, split: str, key: str) -> tuple:
    """(epochs, values) of one metric of one split, in the order written (a resumed run continues the list)."""
    points = [(r['epoch'], r[key]) for r in records if r.get('split') == split and key in r]
    return tuple(zip(*points)) if points else ((), ())


def plot_curves(records: list, png_path: str) -> None:
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for split, key, label in (('train', 'loss', 'train'), ('val', 'loss', 'val'), ('val', 'ema_loss', 'val EMA')):
        epochs, values = series(records, split, key)
        if epochs:  # a run without evaluation (pre-training) or EMA has no such line
            loss_axes.plot(epochs, values, marker='.', label=label)
    for split, key, label in (('train', 'acc1', 'train (mixed targets)'), ('val', 'acc1', 'val'),
                              ('val', 'ema_acc1', 'val EMA'), ('train', 'mlm_acc', 'train MLM (masked patches)')):
        epochs, values = series(records, split, key)
        if epochs:
            acc_axes.plot(epochs, [100 * v for v in values], marker='.', label=label)
    loss_axes.set(xlabel='epoch', ylabel='loss', title='loss')
    acc_axes.set(xlabel='epoch', ylabel='accuracy (%)', title='top-1 accuracy (pre-training: MLM accuracy)')
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Plot a run\'s loss and accuracy curves')
    parser.add_argument('-output', required=True, help='the run folder holding metrics.jsonl')
    args = parser.parse_args(argv)
    try:
        records = read_metrics(os.path.join(args.output, 'metrics.jsonl'))
    except (FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    png_path = os.path.join(args.output, 'curves.png')
    plot_curves(records, png_path)
    print(f'wrote {png_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
