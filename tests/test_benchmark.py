"""benchmark.py runs every path it offers on a tiny model and prints one row per path (speed is not tested)."""
import subprocess
import sys

import pytest

from cpu_runtime import cpu_vendor
from helpers import ROOT

pytestmark = pytest.mark.slow  # benchmark.py in subprocesses


def test_every_path_runs_and_is_reported():
    result = subprocess.run([sys.executable, str(ROOT / 'benchmark.py'), '-cfg', 'configs/beit_tiny_patch4_32.yaml',
                             '-batch_size', '2', '-warmup', '1', '-steps', '2', '-mode', 'train',
                             '-backend', 'dygraph', 'static', 'dygraph_ddp', 'timm', 'timm_bf16'],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    cpu, _, _, *table, scaling = result.stdout.splitlines()
    assert cpu.startswith('CPU: ') and cpu_vendor() in cpu, result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert sorted(rows) == ['dygraph', 'dygraph_ddp', 'static', 'timm', 'timm_bf16'], result.stdout
    assert scaling.startswith('dygraph_ddp: 2 processes give'), result.stdout
    assert all(len(values) == 4 and float(values[0]) > 0 for values in rows.values()), result.stdout
    assert float(rows['timm'][1]) == 1.0


def test_gemm_mode_reports_each_case():
    result = subprocess.run([sys.executable, str(ROOT / 'benchmark.py'), '-mode', 'gemm', '-backend', 'paddle',
                             'paddle_avx2_after_first_gemm', 'numpy'],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    cpu, _, *rows = result.stdout.splitlines()
    assert cpu.startswith('CPU: ')
    assert [row.split()[0] for row in rows] == ['paddle', 'paddle_avx2_after_first_gemm', 'numpy'], result.stdout
    assert all(float(row.split()[1]) > 0 and row.endswith('GFLOP/s') for row in rows), result.stdout
