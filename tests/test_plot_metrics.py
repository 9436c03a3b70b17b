"""plot_metrics.py: curves from metrics.jsonl, clear errors for missing or broken files."""
import json

from PIL import Image

from plot_metrics import main, read_metrics, series

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
