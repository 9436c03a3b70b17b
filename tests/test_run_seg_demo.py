"""The segmentation demo's command: a one-epoch run trains, evaluates and plots into its -output folder; against the
stand-in python of test_run_scripts, the commands it runs (the processes, the flags each step gets)."""
import json
import os
import subprocess

import pytest

from helpers import ROOT
from test_run_scripts import standin  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow  # run_seg_demo.sh in a subprocess, 2 training processes

SHORT = ('-opts', 'TRAIN.NUM_EPOCHS', '1', 'VALIDATE_FREQ', '1', 'SEG.WARMUP_ITERS', '10',
         'SEG.SLIDE_STRIDE', '56')  # 37 steps per process, 2x2 windows or fewer per canvas: ~1 minute here


def test_a_short_run_trains_and_plots_into_its_output_folder(tmp_path):
    """-output DIR among the flags: the run trains and plots there (OUTPUT, the default's variable, names another
    folder, which must stay unused)."""
    output = tmp_path / 'seg-demo'
    env = {**os.environ, 'OUTPUT': str(tmp_path / 'default')}
    result = subprocess.run(['bash', str(ROOT / 'run_seg_demo.sh'), '-output', str(output), *SHORT],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]
    [final] = [r for r in records if r['split'] == 'val']
    assert final['epoch'] == 1 and final['num_samples'] == 100 and 0 <= final['miou'] <= 1
    for name in ('curves.png', 'predictions.png', 'checkpoint-best.pdparams'):
        assert (output / name).is_file(), name
    assert f'wrote {output / "predictions.png"} (8 validation images)' in result.stdout
    assert not (tmp_path / 'default').exists()


def test_the_flags_reach_training_and_the_picture_which_reads_the_best_weights(standin):  # noqa: F811
    start = 'output/demo/checkpoint-best.pdparams'  # a classification run's weights as the starting point
    result, commands = standin('run_seg_demo.sh', 'cpu', '-output', 'out', '-pretrained', start, *SHORT)
    assert result.returncode == 0, result.stderr
    steps = [c['args'] for c in commands if c['args'][0].endswith('.py')]
    flags = ['-output', 'out', '-pretrained', start, *SHORT]
    config = 'configs/beit_tiny_seg_fashion.yaml'
    assert steps == [['main_segment.py', '-ngpus', '2', '-cfg', config, '-output', 'out', *flags],
                     ['plot_metrics.py', '-output', 'out'],
                     ['plot_segmentation.py', '-cfg', config, '-output', 'out', *flags,
                      '-pretrained', 'out/checkpoint-best.pdparams']]
