"""The BEiT v2 demo's command (run_v2_demo.sh): against the stand-in python of test_run_scripts, the steps it runs in
order (teacher, tokenizer, pre-training, probes and fine-tuning from the pre-trained and from random weights), each in
its own folder of -output DIR with the user's flags last (the probes take PROBE_EPOCHS instead); a one-epoch run of
every step really trains."""
import json
import os
import subprocess

import pytest

from helpers import ROOT
from test_run_scripts import standin  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow  # run_v2_demo.sh in a subprocess

SHORT = ('-opts', 'TRAIN.NUM_EPOCHS', '1')
PRETRAINING = 'configs/beitv2_tiny_pretrain_fashion_mnist.yaml'
CLASSIFICATION = 'configs/beit_tiny_fashion_mnist.yaml'


def training_steps(commands) -> list[list[str]]:
    return [c['args'] for c in commands if c['args'][0].startswith('main_')]


def test_the_steps_chain_teacher_tokenizer_pretraining_and_both_starts(standin, tmp_path):  # noqa: F811
    out = tmp_path / 'out'
    (out / 'pretrain').mkdir(parents=True)  # the stand-in trains nothing: the checkpoints pre-training would write
    for epoch in (2, 10):
        (out / 'pretrain' / f'checkpoint-epoch-{epoch}.pdparams').touch()
    result, commands = standin('run_v2_demo.sh', 'cpu', '-output', str(out), *SHORT, PROBE_EPOCHS='3')
    assert result.returncode == 0, result.stderr
    newest = str(out / 'pretrain' / 'checkpoint-epoch-10.pdparams')

    def step(script, config, folder, *flags, user=SHORT):
        return [script, '-ngpus', '2', '-cfg', config, '-output', str(out / folder), *flags, *user]

    assert training_steps(commands) == [
        step('main_multi_gpu.py', CLASSIFICATION, 'teacher'),
        step('main_tokenizer.py', 'configs/vqkd_tiny_fashion_mnist.yaml', 'tokenizer',
             '-opts', 'VQKD.TEACHER_WEIGHTS', str(out / 'teacher' / 'checkpoint-best.pdparams')),
        step('main_pretrain.py', PRETRAINING, 'pretrain',
             '-opts', 'PRETRAIN.TOKENIZER_WEIGHTS', str(out / 'tokenizer' / 'checkpoint-best.pdparams')),
        step('main_linprobe.py', PRETRAINING, 'probe-pretrained', '-pretrained', newest,
             '-opts', 'LINPROBE.NUM_EPOCHS', '3', 'LINPROBE.BASE_LR', '0.4', user=()),
        step('main_multi_gpu.py', CLASSIFICATION, 'finetune-pretrained', '-pretrained', newest,
             '-opts', 'TRAIN.NUM_EPOCHS', '10', 'TRAIN.MODEL_EMA', 'False'),
        step('main_linprobe.py', PRETRAINING, 'probe-random', '-opts', 'LINPROBE.NUM_EPOCHS', '3',
             'LINPROBE.BASE_LR', '0.4', user=()),
        step('main_multi_gpu.py', CLASSIFICATION, 'finetune-random', '-opts', 'TRAIN.NUM_EPOCHS', '10',
             'TRAIN.MODEL_EMA', 'False')]
    plotted = [c['args'][-1] for c in commands if c['args'][0] == 'plot_metrics.py']
    assert plotted == [str(out / folder) for folder in ('teacher', 'tokenizer', 'pretrain', 'probe-pretrained',
                                                         'finetune-pretrained', 'probe-random', 'finetune-random')]


def test_a_given_teacher_is_used_instead_of_training_one(standin, tmp_path):  # noqa: F811
    out = tmp_path / 'out'
    (out / 'pretrain').mkdir(parents=True)
    (out / 'pretrain' / 'checkpoint-epoch-1.pdparams').touch()
    result, commands = standin('run_v2_demo.sh', 'cpu', '-output', str(out), TEACHER='demo/best.pdparams')
    assert result.returncode == 0, result.stderr
    first = training_steps(commands)[0]
    assert first[0] == 'main_tokenizer.py' and first[-2:] == ['VQKD.TEACHER_WEIGHTS', 'demo/best.pdparams']


def test_a_one_epoch_run_of_every_step_trains_in_its_folder(tmp_path):
    output = tmp_path / 'v2-demo'
    env = {**os.environ, 'OUTPUT': str(tmp_path / 'default'), 'PROBE_EPOCHS': '1'}
    result = subprocess.run(['bash', str(ROOT / 'run_v2_demo.sh'), '-output', str(output), *SHORT],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, split, key in [('teacher', 'val', 'acc1'), ('tokenizer', 'val', 'codes_used'),
                               ('pretrain', 'train', 'mlm_acc_cls'), ('probe-pretrained', 'val', 'best_acc1'),
                               ('probe-random', 'val', 'best_acc1'), ('finetune-pretrained', 'val', 'acc1'),
                               ('finetune-random', 'val', 'acc1')]:
        records = [json.loads(line) for line in (output / folder / 'metrics.jsonl').read_text().splitlines()]
        [last] = [record for record in records if record['split'] == split]
        assert last['epoch'] == 1 and key in last, (folder, last)
        assert (output / folder / 'curves.png').is_file(), folder
    assert 'dropped the pre-training-only tensors' in (output / 'finetune-pretrained' / 'log.txt').read_text()
    assert not (tmp_path / 'default').exists()
