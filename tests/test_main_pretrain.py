"""main_pretrain.py as users run it, on the embedded Fashion-MNIST set: a tiny pre-training run whose MIM loss
and MLM accuracy beat the best guess blind to the image, fine-tuning started from its checkpoint, bad input
refused with nothing written, two processes (with -amp and an EMA) through run_pretrain_multi.sh; BEiT v2 (VQ-KD
tokenizer, CLS branch): its logs, its handover to fine-tuning, its bad settings, an exact SIGKILL + resume."""
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
from helpers import ROOT, assert_reads_as_paddle_load, kill_during, records
from task_finetune import FINE_TUNING
from task_pretrain import build_tokenizer_for
from utils import seed_everything, start_logger
from vqkd_tokenizer import build_vqkd_tokenizer

DEMO = ROOT / 'data' / 'fashion_mnist'
PRETRAIN_CONFIG = str(ROOT / 'configs' / 'beit_tiny_pretrain_fashion_mnist.yaml')
FINE_TUNE_CONFIG = str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml')
EPOCHS = 15
FAST = ['DATA.NUM_WORKERS', '0', 'REPORT_FREQ', '5', 'SAVE_FREQ', '5', 'TRAIN.WARMUP_EPOCHS', '1']
# 285 steps learn more than the code frequencies with an LR that stays high, no drop path (~100 s, 2 cores). With
# unilm's pre-training init (the patch embedding's conv too: std 0.02 cut at +-0.02) a peak of 3e-3 after one
# warm-up epoch keeps this tiny model at the constant guess (0.447 vs 0.438 after 10 epochs, measured): AdamW's steps
# are large next to such small weights, so a lower LR, warmed up over 2 epochs
QUICK_LEARNING = ['TRAIN.BASE_LR', '1e-3', 'TRAIN.END_LR', '5e-4', 'TRAIN.WARMUP_EPOCHS', '2', 'MODEL.DROPPATH', '0.0']
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
    assert train[-1]['mlm_acc'] > constant_accuracy + 0.05 > 1 / 512  # (measured: 0.595 vs 0.438)
    assert losses[-1] < constant_loss - 0.1  # the context of the visible patches is used (1.14 vs 1.40)
    log = (pretrain_run / 'log.txt').read_text()
    assert 'masked image modeling pre-training: 1 process(es)' in log and f'epoch {EPOCHS}/{EPOCHS} step 19/19' in log
    assert 'mlm_acc' in log and records(pretrain_run, 'val') == []  # pre-training has no evaluation
    checkpoint = paddle.load(str(pretrain_run / f'checkpoint-epoch-{EPOCHS}.pdparams'))  # as other tools read it
    assert_reads_as_paddle_load(pretrain_run / f'checkpoint-epoch-{EPOCHS}.pdparams')  # as this project reads it
    assert {'mask_token', 'lm_head.weight', 'rel_pos_bias.relative_position_bias_table'} <= set(checkpoint['model'])


def fine_tuning_log(weights, data, output) -> str:
    """The log of one epoch of fine-tuning (main_single_gpu.py) from ``weights``."""
    run([sys.executable, str(ROOT / 'main_single_gpu.py'), '-cfg', FINE_TUNE_CONFIG, '-data_path', str(data),
         '-output', str(output), '-pretrained', str(weights),
         '-opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.NUM_EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0'])
    return (output / 'log.txt').read_text()


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
    log = fine_tuning_log(weights, demo_subset, output)
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


# ---- BEiT v2 ----------------------------------------------------------------------------------------------------

V2_CONFIG = str(ROOT / 'configs' / 'beitv2_tiny_pretrain_fashion_mnist.yaml')
V2_RANDOM_TOKENIZER = ['PRETRAIN.RANDOM_TOKENIZER', 'True']  # the config needs a trained tokenizer's weights


@pytest.fixture(scope='module')
def small_subset(tmp_path_factory):
    """Every 32nd image of the embedded train set (156), listed by absolute path: 9 steps of 16 per epoch."""
    root = tmp_path_factory.mktemp('fashion_mnist_small')
    lines = (DEMO / 'train_list.txt').read_text().splitlines()[::32]
    (root / 'train_list.txt').write_text(''.join(f'{DEMO / line}\n' for line in lines))
    return root


def v2_command(data, output, *flags, opts=()):
    return [sys.executable, str(ROOT / 'main_pretrain.py'), '-cfg', V2_CONFIG, '-data_path', str(data),
            '-output', str(output), '-batch_size', '16', *flags, '-opts', *FAST, *V2_RANDOM_TOKENIZER,
            'REPORT_FREQ', '1', *opts]


@pytest.fixture(scope='module')
def v2_run(small_subset, tmp_path_factory):
    output = tmp_path_factory.mktemp('v2') / 'run'
    run(v2_command(small_subset, output, opts=['TRAIN.NUM_EPOCHS', '2']))
    return output


@pytest.mark.slow
def test_v2_pretraining_logs_both_branches(v2_run):
    train = records(v2_run)
    assert [r['epoch'] for r in train] == [1, 2]
    for record in train:
        assert record['num_samples'] == 9 * 16 and record['num_masked'] == 9 * 16 * 6
        assert record['loss'] == pytest.approx(record['loss_main'] + record['loss_cls'], rel=1e-6)  # float32 sums
        assert 0 <= record['mlm_acc_cls'] <= 1 and 0 <= record['mlm_acc'] <= 1
        assert np.log(512) < record['loss'] < 2 * np.log(512) + 1  # two cross entropies near a uniform guess
    log = (v2_run / 'log.txt').read_text()
    assert 'masked image modeling pre-training: 1 process(es)' in log and 'TOKENIZER: vqkd' in log
    checkpoint = paddle.load(str(v2_run / 'checkpoint-epoch-2.pdparams'))['model']
    assert {'cls_pt_layers.0.attn.qkv.weight', 'cls_pt_layers.1.mlp.fc2.weight', 'mask_token'} <= set(checkpoint)
    assert not any(name.startswith('cls_pt_lm_head') for name in checkpoint)  # SHARED_LM_HEAD


@pytest.mark.slow
def test_v2_checkpoint_starts_fine_tuning_through_the_scripts_naming_the_dropped_branch(v2_run, demo_subset,
                                                                                     tmp_path):
    weights = v2_run / 'checkpoint-epoch-2.pdparams'
    output = tmp_path / 'fine_tune'
    log = fine_tuning_log(weights, demo_subset, output)
    assert f'loaded weights from {weights}' in log
    # the CLS branch's 2 blocks of 15 tensors (the shared table is not theirs), with v1's mask token and lm head
    assert ('note: dropped the pre-training-only tensors (the model has no place for them): mask_token (1), '
            'lm_head (2), cls_pt_layers (30)') in log
    assert 'note: copied the shared relative position bias into 4 blocks' in log
    (val,) = records(output, 'val')
    assert val['num_samples'] == 125 and np.isfinite(val['loss'])


@pytest.fixture
def foreign_codebook(tmp_path):
    """VQ-KD weights of the demo's architecture but a 256-entry codebook (the config says 512)."""
    path = tmp_path / 'vqkd_256.pdparams'
    paddle.save(build_vqkd_tokenizer(None, img_size=28, patch_size=7, in_chans=3, embed_dim=64, depth=2, num_heads=2,
                                     mlp_ratio=4.0, codebook_size=256, codebook_dim=32).state_dict(), str(path))
    return path


V2_BAD_INPUTS = {
    'early layers beyond the depth': (['PRETRAIN.EARLY_LAYERS', '5'], 'PRETRAIN.EARLY_LAYERS 5 is outside [1, '
                                                                      'MODEL.DEPTH 4]'),
    'no head layer': (['PRETRAIN.HEAD_LAYERS', '0'], 'PRETRAIN.HEAD_LAYERS must be positive'),
    'vocabulary unlike the codebook': (['PRETRAIN.VOCAB_SIZE', '256'], 'PRETRAIN.VOCAB_SIZE 256 differs from '
                                                                       'VQKD.CODEBOOK_SIZE 512'),
    'tokenizer grid unlike the patch grid': (['VQKD.PATCH_SIZE', '14'], 'PRETRAIN.SECOND_INPUT_SIZE 28 gives the '
                                                                        'tokenizer 2 tokens per side (14 px each, '
                                                                        'VQKD.PATCH_SIZE)'),
    'weights of another codebook': (['PRETRAIN.RANDOM_TOKENIZER', 'False', 'PRETRAIN.TOKENIZER_WEIGHTS', 'FOREIGN'],
                                    'PRETRAIN.TOKENIZER_WEIGHTS: cannot load'),
}


@pytest.mark.parametrize('fresh', [False, True])  # an earlier run's folder left as it was / no folder created
@pytest.mark.parametrize('case', sorted(V2_BAD_INPUTS))
def test_bad_v2_input_exits_2_naming_the_key_and_writes_nothing(case, fresh, small_subset, used_output,
                                                                foreign_codebook, tmp_path, capfd):
    """The tokenizer (weights read and checked) is built in job.prepare, before the run folder is opened."""
    opts, message = V2_BAD_INPUTS[case]
    opts = [str(foreign_codebook) if item == 'FOREIGN' else item for item in opts]
    output = tmp_path / 'never' if fresh else used_output
    before = {} if fresh else {path.name: path.read_bytes() for path in used_output.iterdir()}
    code = main_pretrain.main(['-cfg', V2_CONFIG, '-data_path', str(small_subset), '-output', str(output),
                               '-batch_size', '16', '-opts', 'DATA.NUM_WORKERS', '0', 'TRAIN.NUM_EPOCHS', '1',
                               *V2_RANDOM_TOKENIZER, *opts])
    assert code == 2
    assert message in capfd.readouterr().err
    if fresh:
        assert not output.exists()
    else:
        assert {path.name: path.read_bytes() for path in used_output.iterdir()} == before


def test_a_foreign_codebook_is_refused_by_the_tokenizer_not_the_config(foreign_codebook, capfd, small_subset,
                                                                       tmp_path):
    """The weights case above is caught when the file is read (its codebook is 256 x 32), naming the VQKD keys."""
    code = main_pretrain.main(['-cfg', V2_CONFIG, '-data_path', str(small_subset), '-output', str(tmp_path / 'out'),
                               '-opts', 'DATA.NUM_WORKERS', '0', 'PRETRAIN.RANDOM_TOKENIZER', 'False',
                               'PRETRAIN.TOKENIZER_WEIGHTS', str(foreign_codebook)])
    err = capfd.readouterr().err
    assert code == 2 and 'as a VQ-KD tokenizer of PRETRAIN.SECOND_INPUT_SIZE 28 px' in err
    assert 'CODEBOOK_SIZE 512' in err and 'quantize.embedding.weight' in err
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def v2_resumed_runs(small_subset, tmp_path_factory):
    """An uninterrupted 3-epoch v2 run, and one SIGKILLed in the middle of epoch 2, then resumed from its epoch-1
    checkpoint (drop path 0.1, random masks and crops: every random draw must be restored)."""
    root = tmp_path_factory.mktemp('v2_resume')
    opts = ['TRAIN.NUM_EPOCHS', '3', 'SAVE_FREQ', '1']
    run(v2_command(small_subset, root / 'full', opts=opts))
    killed = root / 'killed'
    kill_during(v2_command(small_subset, killed, opts=opts), killed / 'log.txt', 'epoch 2/3 step 4/9')
    assert sorted(p.name for p in killed.glob('checkpoint-epoch-*')) == ['checkpoint-epoch-1.pdparams']
    run(v2_command(small_subset, killed, '-resume', str(killed / 'checkpoint-epoch-1.pdparams'), opts=opts))
    return root / 'full', killed


def assert_same_tensors(resumed, full, where):
    """Every tensor of ``full`` (nested dicts) equal, bit for bit, in ``resumed``."""
    if isinstance(full, dict):
        assert set(resumed) == set(full), where
        for key, value in full.items():
            assert_same_tensors(resumed[key], value, f'{where}[{key!r}]')
    elif isinstance(full, paddle.Tensor):
        np.testing.assert_array_equal(resumed.numpy(), full.numpy(), err_msg=where)
    elif isinstance(full, (int, float, str, bool, list)) or full is None:
        assert resumed == full, where


@pytest.mark.slow
def test_v2_killed_and_resumed_run_ends_with_the_uninterrupted_weights_exactly(v2_resumed_runs):
    full, killed = (paddle.load(str(folder / 'checkpoint-epoch-3.pdparams')) for folder in v2_resumed_runs)
    assert any(name.startswith('cls_pt_layers') for name in full['model'])
    for part in ('model', 'optimizer', 'lr_scheduler', 'grad_scaler'):
        assert_same_tensors(killed[part], full[part], part)
    assert killed['global_step'] == full['global_step'] == 27
    full_train, killed_train = (records(folder) for folder in v2_resumed_runs)
    assert [r['epoch'] for r in killed_train] == [1, 2, 3]  # epoch 2's killed half left no record
    for one, two in zip(full_train, killed_train):
        for key in ('loss', 'loss_main', 'loss_cls', 'mlm_acc', 'mlm_acc_cls', 'num_masked'):
            assert one[key] == two[key], key
