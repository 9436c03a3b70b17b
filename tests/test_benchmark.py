"""benchmark.py runs every path it offers on a tiny model and prints one row per path (speed is not tested); it
refuses a path, config or mode that does not fit the task before any child starts."""
import re
import subprocess
import sys

import pytest

from benchmark import build_parser, check_choices
from cpu_runtime import cpu_vendor
from helpers import ROOT, TINY_CONFIG

TINY_SEG = str(ROOT / 'configs' / 'beit_tiny_seg.yaml')
BASE_SEG = str(ROOT / 'configs' / 'upernet_beit_base_640_ade20k.yaml')


def run_benchmark(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'benchmark.py'), *arguments], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.slow  # benchmark.py in subprocesses
def test_every_path_runs_and_is_reported():
    result = run_benchmark('-cfg', 'configs/beit_tiny_patch4_32.yaml', '-batch_size', '2', '-warmup', '1', '-steps',
                           '2', '-mode', 'train', '-backend', 'dygraph', 'static', 'dygraph_ddp', 'timm', 'timm_bf16')
    assert result.returncode == 0, result.stderr[-2000:]
    cpu, _, _, *table, scaling = result.stdout.splitlines()
    assert cpu.startswith('CPU: ') and cpu_vendor() in cpu, result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert sorted(rows) == ['dygraph', 'dygraph_ddp', 'static', 'timm', 'timm_bf16'], result.stdout
    assert scaling.startswith('dygraph_ddp: 2 processes give'), result.stdout
    assert all(len(values) == 4 and float(values[0]) > 0 for values in rows.values()), result.stdout
    assert float(rows['timm'][1]) == 1.0


@pytest.mark.slow
def test_gemm_mode_reports_each_case():
    result = run_benchmark('-mode', 'gemm', '-backend', 'paddle', 'paddle_avx2_after_first_gemm', 'numpy')
    assert result.returncode == 0, result.stderr[-2000:]
    cpu, _, *rows = result.stdout.splitlines()
    assert cpu.startswith('CPU: ')
    assert [row.split()[0] for row in rows] == ['paddle', 'paddle_avx2_after_first_gemm', 'numpy'], result.stdout
    assert all(float(row.split()[1]) > 0 and row.endswith('GFLOP/s') for row in rows), result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_segmentation_rows_run_next_to_transformers(mode):
    """-task segmentation measures BeitUperNet in dygraph and to_static next to transformers, ratios against it."""
    result = run_benchmark('-cfg', TINY_SEG, '-task', 'segmentation', '-batch_size', '2', '-warmup', '1', '-steps',
                           '2', '-mode', mode)
    assert result.returncode == 0, result.stderr[-2000:]
    cpu, title, header, *table = result.stdout.splitlines()
    assert cpu.startswith('CPU: ') and title.startswith(f'segmentation {mode}, beit_tiny_seg.yaml, batch 2'), title
    assert header.split()[:6] == ['backend', 'img/s', 'x', 'transformers', 'peak', 'MB'], header
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert sorted(rows) == ['dygraph', 'static', 'transformers'], result.stdout
    assert all(len(values) == 4 and float(values[0]) > 0 for values in rows.values()), result.stdout
    assert rows['transformers'][1] == rows['transformers'][3] == '1.00'
    reference = float(rows['transformers'][0])
    for values in rows.values():  # the ratio columns are the rows' own numbers over transformers', up to rounding:
        rate = float(values[0])   # each printed to 0.01, so rate / reference is off by up to its relative errors
        slack = 0.005 + rate / reference * (0.005 / rate + 0.005 / reference)
        assert abs(float(values[1]) - rate / reference) <= slack, values


@pytest.mark.parametrize('arguments, message', [
    (['-cfg', TINY_CONFIG, '-task', 'segmentation'],
     'a classification config .* -task segmentation needs a segmentor'),
    (['-cfg', TINY_CONFIG, '-task', 'segmentation', '-opts', 'SEG.NUM_CLASSES', '3'],
     'a classification config'),
    (['-cfg', TINY_SEG], 'a segmentation config .*: add -task segmentation'),
    (['-cfg', TINY_SEG, '-task', 'segmentation', '-backend', 'dygraph', 'timm'],
     '-backend timm: no such path of segmentation'),
    (['-cfg', TINY_SEG, '-task', 'segmentation', '-backend', 'inference', '-mode', 'eval'],
     '-backend inference: no such path of segmentation'),
    (['-cfg', TINY_CONFIG, '-backend', 'transformers'],
     '-backend transformers: no such path of classification'),
    (['-mode', 'gemm', '-task', 'segmentation'], '-mode gemm measures a matmul: it takes no -task'),
    (['-mode', 'gemm', '-backend', 'dygraph'], '-backend dygraph: no such path of -mode gemm'),
    (['-cfg', TINY_SEG, '-task', 'segmentation', '-opts', 'SEG.CHANNELS', '16'],
     "transformers' UperHead is as wide as the encoder"),
    (['-cfg', TINY_SEG, '-task', 'segmentation', '-opts', 'SEG.CHANNELS'], '-opts needs KEY VALUE pairs'),
    (['-cfg', TINY_SEG, '-task', 'segmentation', '-mode', 'train', '-batch_size', '1'],
     '-mode train needs -batch_size 2 or more'),
    (['-cfg', str(ROOT / 'configs' / 'missing.yaml'), '-task', 'segmentation'],
     'configs/missing.yaml: config file not found'),
])
def test_bad_combinations_are_refused_with_exit_2(arguments, message, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        check_choices(parser, parser.parse_args(arguments))
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err), message


@pytest.mark.parametrize('arguments', [
    ['-cfg', TINY_SEG, '-task', 'segmentation', '-batch_size', '1'],  # eval
    ['-cfg', TINY_SEG, '-task', 'segmentation', '-backend', 'dygraph', '-opts', 'SEG.CHANNELS', '16'],
    ['-cfg', BASE_SEG, '-task', 'segmentation', '-opts', 'DATA.IMAGE_SIZE', '256'],
    ['-cfg', TINY_CONFIG, '-backend', 'dygraph', 'timm'],
    ['-mode', 'gemm', '-backend', 'paddle', 'numpy'],
])
def test_fitting_combinations_pass_the_checks(arguments):
    """Our segmentor alone may be narrower than transformers can express."""
    parser = build_parser()
    check_choices(parser, parser.parse_args(arguments))
