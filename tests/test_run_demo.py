"""README command 1, shortened: the demo trains on the embedded set in 2 processes and beats chance clearly."""
import json
import os
import subprocess

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # run_demo.sh in a subprocess, 2 training processes

CHANCE = 0.1  # 10 balanced classes


def test_short_demo_run_learns_and_plots_into_its_output_folder(tmp_path):
    """-output DIR among the flags: the run trains and plots there (OUTPUT, the default's variable, names another
    folder, which must stay unused)."""
    output = tmp_path / 'demo'
    env = {**os.environ, 'OUTPUT': str(tmp_path / 'default')}
    result = subprocess.run(['bash', str(ROOT / 'run_demo.sh'), '-output', str(output), '-opts', 'TRAIN.NUM_EPOCHS',
                             '3', 'TRAIN.WARMUP_EPOCHS', '1'], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]
    final = [r for r in records if r['split'] == 'val'][-1]
    assert final['epoch'] == 3 and final['num_samples'] == 1000
    assert final['acc1'] > 3 * CHANCE
    assert (output / 'curves.png').is_file()
    assert (output / 'checkpoint-epoch-3.pdparams').is_file()
    assert not (tmp_path / 'default').exists()
