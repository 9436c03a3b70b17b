"""main_pretrain.py as users run it, on the embedded Fashion-MNIST set: a tiny pre-training run whose MIM loss
and MLM accuracy beat the best guess blind to the image, fine-tuning started from its checkpoint, bad input
refused with nothing written, two processes (with -amp and an EMA) through run_pretrain_multi.sh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

import job
import main_pretrain
from config import get_config, merge_opts
from datasets import get_pretraining_dataset
from device_batch import tokenizer_input
from engine import World
from helpers import ROOT, assert_reads_as_paddle_load
from task_finetune import FINE_TUNING
from task_pretrain import build_tokenizer_for
from utils import seed_everything, start_logger

DEMO = ROOT / 'data' / 'fashion_mnist'
PRETRAIN_CONFIG = str(ROOT / 'configs' / 'beit_tiny_pretrain_fashion_mnist.yaml')
FINE_TUNE_CONFIG = str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml')
EPOCHS = 10
FAST = ['DATA.NUM_WORKERS', '0', 'REPORT_FREQ', '5', 'SAVE_FREQ', '5', 'TRAIN.WARMUP_EPOCHS', '1']
# 190 steps learn more than the code frequencies with a higher LR that stays high, no drop path (~65 s, 2 cores)
QUICK_LEARNING = ['TRAIN.BASE_LR', '3e-3', 'TRAIN.END_LR', '1e-3', 'MODEL.DROPPATH', '0.0']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}'}


@pytest.fixture(scope='module')
def demo_subset(tmp_path_factory):
    """Every 8th image of the embedded set (625 train, 125 val; all classes), listed by absolute path."""
    root = tmp_path_factory.mktemp('fashion_mnist_subset')
    for split in ('train', 'val'):
        lines = (DEMO / f'{split}_list.txt').read_text().splitlines()[::8]
        (root / f'{split}_list.txt').write_text(''.join(f'{DEMO / line}\n' for line in lines))
    return root


def run(cmd, timeout=300, **env):
    result = subprocess.run(cmd, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f'{cmd}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}'
    return result


def records(output, split='train'):
    lines = (Path(output) / 'metrics.jsonl').read_text().splitlines()
    return [record for record in map(json.loads, lines) if record['split'] == split]


def pretrain_command(data, output, *flags, opts=()):
    return [sys.executable, str(ROOT / 'main_pretrain.py'), '-cfg', PRETRAIN_CONFIG, '-data_path', str(data),
            '-output', str(output), *flags, '-opts', *FAST, *opts]


@pytest.fixture(scope='module')
def pretrain_run(demo_subset, tmp_path_factory):
    output = tmp_path_factory.mktemp('pretrain') / 'run'
    run(pretrain_command(demo_subset, output, opts=['TRAIN.NUM_EPOCHS', str(EPOCHS), *QUICK_LEARNING]))
    return output


def best_constant_guess(data, samples=320) -> tuple[float, float]:
    """What a model blind to the image reaches: (MLM accuracy of always naming the commonest visual token, loss of
    always predicting the token frequencies, i.e. their entropy), measured with the run's tokenizer (random
    weights seeded by SEED) on freshly augmented samples (uint8 views, scaled as the loader does after the
    transfer)."""
    config = get_config(PRETRAIN_CONFIG)
    merge_opts(config, ['DATA.DATA_PATH', str(data)])
    dataset, tokenizer = get_pretraining_dataset(config), build_tokenizer_for(config)
    seed_everything(1)
    _, tokenizer_views, masks, _ = (np.stack(part) for part in zip(*(dataset[i] for i in range(samples))))
    ids = tokenizer.get_codebook_indices(tokenizer_input(paddle.to_tensor(tokenizer_views))).numpy()
    frequencies = np.bincount(ids[masks]) / masks.sum()
    frequencies = frequencies[frequencies > 0]
    return frequencies.max(), -(frequencies * np.log(frequencies)).sum()


@pytest.mark.slow
def test_pretraining_loss_falls_and_mlm_accuracy_beats_the_best_constant_guess(pretrain_run, demo_subset):
    train = records(pretrain_run)
    assert [r['epoch'] for r in train] == list(range(1, EPOCHS + 1))
    assert all(r['num_samples'] == 19 * 32 and r['num_masked'] == 19 * 32 * 6 for r in train)
    losses = [r['loss'] for r in train]
    assert losses[-1] < 0.6 * losses[0] and losses[-1] < np.log(512)  # below a uniform guess over the vocabulary
    constant_accuracy, constant_loss = best_constant_guess(demo_subset)
    assert train[-1]['mlm_acc'] > constant_accuracy + 0.05 > 1 / 512  # (measured: 0.549 vs 0.438)
    assert losses[-1] < constant_loss - 0.1  # the context of the visible patches is used (1.20 vs 1.40)
    log = (pretrain_run / 'log.txt').read_text()
    assert 'masked image modeling pre-training: 1 process(es)' in log and f'epoch {EPOCHS}/{EPOCHS} step 19/19' in log
    assert 'mlm_acc' in log and records(pretrain_run, 'val') == []  # pre-training has no evaluation
    checkpoint = paddle.load(str(pretrain_run / f'checkpoint-epoch-{EPOCHS}.pdparams'))  # as other tools read it
    assert_reads_as_paddle_load(pretrain_run / f'checkpoint-epoch-{EPOCHS}.pdparams')  # as this project reads it
    assert {'mask_token', 'lm_head.weight', 'rel_pos_bias.relative_position_bias_table'} <= set(checkpoint['model'])


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretraining_checkpoint(pretrain_run, demo_subset, tmp_path):
    weights = pretrain_run / f'checkpoint-epoch-{EPOCHS}.pdparams'
    shared = paddle.load(str(weights))['model']['rel_pos_bias.relative_position_bias_table'].numpy()
    assert np.abs(shared).max() > 1e-3  # pre-training moved the table away from its zero init
    config = get_config(FINE_TUNE_CONFIG)
    merge_opts(config, ['DATA.DATA_PATH', str(demo_subset), 'MODEL.PRETRAINED', str(weights), 'SAVE',
                        str(tmp_path / 'in_process'), 'DATA.NUM_WORKERS', '0'])
    start = job.prepare(config, World(), start_logger(is_main=False), FINE_TUNING)
    for block in start.model.blocks:
        np.testing.assert_array_equal(block.attn.relative_position_bias_table.numpy(), shared)

    output = tmp_path / 'fine_tune'
    run([sys.executable, str(ROOT / 'main_single_gpu.py'), '-cfg', FINE_TUNE_CONFIG, '-data_path', str(demo_subset),
         '-output', str(output), '-pretrained', str(weights),
         '-opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.NUM_EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0'])
    log = (output / 'log.txt').read_text()
    assert f'loaded weights from {weights}' in log
    assert 'note: copied the shared relative position bias into 4 blocks' in log
    assert 'note: ignored norm.weight, norm.bias (the model pools with fc_norm)' in log
    (val,) = records(output, 'val')
    assert val['num_samples'] == 125 and np.isfinite(val['loss'])


BAD_INPUTS = {
    'tokenizer weights not given': (['PRETRAIN.RANDOM_TOKENIZER', 'False'], 'PRETRAIN.TOKENIZER_WEIGHTS is not set'),
    'tokenizer weights missing': (['PRETRAIN.TOKENIZER_WEIGHTS', 'nowhere/dalle_encoder.pdparams'],
                                  'PRETRAIN.TOKENIZER_WEIGHTS: file not found: nowhere/dalle_encoder.pdparams'),
    'tokenizer weights unreadable': (['PRETRAIN.TOKENIZER_WEIGHTS', str(ROOT / 'README.md')],
                                     f'PRETRAIN.TOKENIZER_WEIGHTS: cannot load {ROOT / "README.md"}'),
    'second size off the patch grid': (['PRETRAIN.SECOND_INPUT_SIZE', '64'],
                                       'PRETRAIN.SECOND_INPUT_SIZE 64 gives the tokenizer 8 tokens per side'),
    'more masks than patches': (['PRETRAIN.NUM_MASK_PATCHES', '17'], 'PRETRAIN.NUM_MASK_PATCHES 17 is more than the '
                                                                     '16 patches'),
}


@pytest.mark.parametrize('ngpus', ['1', pytest.param('2', marks=pytest.mark.slow)])  # 2: spawned processes
@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_key_and_writes_nothing(case, ngpus, demo_subset, used_output, capfd):
    """The earlier run's checkpoint-epoch-2 lies beyond this 1-epoch run: only the bad input stops it."""
    opts, message = BAD_INPUTS[case]
    before = {path.name: path.read_bytes() for path in used_output.iterdir()}
    code = main_pretrain.main(['-cfg', PRETRAIN_CONFIG, '-data_path', str(demo_subset), '-output', str(used_output),
                               '-ngpus', ngpus, '-opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.NUM_EPOCHS', '1', *opts])
    assert code == 2
    assert message in capfd.readouterr().err  # capfd: a spawned process's error reaches the terminal, not sys.stderr
    assert {path.name: path.read_bytes() for path in used_output.iterdir()} == before


def test_eval_is_refused(capsys):
    assert main_pretrain.main(['-cfg', PRETRAIN_CONFIG, '-eval']) == 2
    assert 'pre-training has no evaluation' in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_through_the_script(demo_subset, tmp_path):
    output = tmp_path / 'two'
    run(['sh', 'run_pretrain_multi.sh', '-ngpus', '2', '-output', str(output),
         '-opts', *FAST, 'TRAIN.NUM_EPOCHS', '2', 'TRAIN.MODEL_EMA', 'True', 'TRAIN.MODEL_EMA_DECAY', '0.9'],
        GPUS='', CONFIG=PRETRAIN_CONFIG, DATA_PATH=str(demo_subset), BATCH_SIZE='16', TOKENIZER='')
    train = records(output)
    assert [r['epoch'] for r in train] == [1, 2]
    assert all(r['num_samples'] == 19 * 16 * 2 for r in train)  # 625 images: 19 batches of 16 per process
    assert train[-1]['loss'] < train[0]['loss']
    log = (output / 'log.txt').read_text()
    assert 'masked image modeling pre-training: 2 process(es)' in log and 'AMP requested' in log  # the script's -amp
    checkpoint = paddle.load(str(output / 'checkpoint-epoch-2.pdparams'))
    assert set(checkpoint['model_ema']) == set(checkpoint['model'])  # the EMA of the MIM model, mask token too
    assert not np.array_equal(checkpoint['model_ema']['mask_token'].numpy(), checkpoint['model']['mask_token'].numpy())
