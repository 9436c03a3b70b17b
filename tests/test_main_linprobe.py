"""main_linprobe.py as users run it, on the embedded Fashion-MNIST set: the probe of a tiny pre-training checkpoint
beats chance at its best block, with every block's accuracy in metrics.jsonl, the log and the plot; a resumed run
ends with the uninterrupted run's classifiers and refuses other frozen weights; bad input is refused with nothing
written; two processes."""
import sys

import numpy as np
import paddle
import pytest

import main_linprobe
import plot_metrics
from helpers import assert_reads_as_paddle_load
from test_main_pretrain import EPOCHS as PRETRAIN_EPOCHS
from test_main_pretrain import (  # noqa: F401 (fixtures: the 625 + 125 image subset, its 10-epoch pre-training)
    PRETRAIN_CONFIG,
    ROOT,
    demo_subset,
    pretrain_run,
    records,
    run,
)

CLASSIFIER_KEYS = {f'{block}.{name}' for block in range(4) for name in ('weight', 'bias')}
# The tiny model's block outputs are ~0.1-0.3 in size, far below a ViT-B's: a higher LR than unilm's 1e-3
PROBE = ['DATA.NUM_WORKERS', '0', 'LINPROBE.BASE_LR', '0.4']
EPOCHS = 5


@pytest.fixture(scope='module')
def pretrained(pretrain_run):  # noqa: F811
    return pretrain_run / f'checkpoint-epoch-{PRETRAIN_EPOCHS}.pdparams'


def probe_args(data, output, *flags, opts=()):
    """main_linprobe.py's arguments for the tiny pre-training config on ``data`` in batches of 32."""
    return ['-cfg', PRETRAIN_CONFIG, '-data_path', str(data), '-output', str(output), '-batch_size', '32', *flags,
            '-opts', *PROBE, *opts]


@pytest.fixture(scope='module')
def probe_run(pretrained, tmp_path_factory):
    """5 epochs on the whole embedded set (5,000 train, 1,000 val images) in batches of 128 (~20 s)."""
    output = tmp_path_factory.mktemp('probe') / 'run'
    run([sys.executable, str(ROOT / 'main_linprobe.py'), '-cfg', PRETRAIN_CONFIG, '-output', str(output),
         '-pretrained', str(pretrained), '-opts', *PROBE, 'LINPROBE.NUM_EPOCHS', str(EPOCHS)])
    return output


@pytest.mark.slow
def test_the_probe_of_a_pretraining_checkpoint_beats_chance_at_its_best_block(probe_run, pretrained):
    val = records(probe_run, 'val')
    assert [r['epoch'] for r in val] == list(range(1, EPOCHS + 1))
    last = val[-1]
    accuracies = {block: last[f'acc1_block{block}'] for block in range(4)}
    assert last['num_samples'] == 1000 and last['best_acc1'] == max(accuracies.values())
    assert accuracies[last['best_block']] == last['best_acc1'] >= 0.3  # chance 0.1 (10 classes); measured 0.373
    log = (probe_run / 'log.txt').read_text()
    assert 'linear probing: 1 process(es)' in log and f'loaded weights from {pretrained}' in log
    assert f'epoch {EPOCHS} val: loss ' in log and f'best_block {last["best_block"]} acc1_block0 ' in log
    checkpoint = paddle.load(str(probe_run / f'checkpoint-epoch-{EPOCHS}.pdparams'))
    assert_reads_as_paddle_load(probe_run / f'checkpoint-epoch-{EPOCHS}.pdparams')
    assert set(checkpoint['model']) == CLASSIFIER_KEYS  # the frozen encoder is not saved
    assert checkpoint['frozen_weights']['pretrained'] == str(pretrained)
    assert plot_metrics.main(['-output', str(probe_run)]) == 0
    assert (probe_run / 'blocks.png').stat().st_size > 0


@pytest.mark.slow
def test_a_resumed_probe_ends_with_the_uninterrupted_classifiers(pretrained, demo_subset, tmp_path):  # noqa: F811
    """Epochs 2 and 3 again from the checkpoint of epoch 1, in another folder: the same classifiers and metrics."""
    weights = ['-pretrained', str(pretrained)]
    every_epoch = ['LINPROBE.NUM_EPOCHS', '3', 'SAVE_FREQ', '1', 'KEEP_CHECKPOINTS', '0']
    assert main_linprobe.main(probe_args(demo_subset, tmp_path / 'full', *weights, opts=every_epoch)) == 0
    resumed = ['-resume', str(tmp_path / 'full' / 'checkpoint-epoch-1.pdparams')]
    assert main_linprobe.main(probe_args(demo_subset, tmp_path / 'resumed', *weights, *resumed, opts=every_epoch)) == 0
    full, again = (paddle.load(str(tmp_path / kind / 'checkpoint-epoch-3.pdparams')) for kind in ('full', 'resumed'))
    assert set(again['model']) == CLASSIFIER_KEYS
    for name, value in full['model'].items():
        np.testing.assert_allclose(again['model'][name].numpy(), value.numpy(), rtol=0, atol=1e-6, err_msg=name)
    for name, value in full['optimizer'].items():
        if isinstance(value, paddle.Tensor):
            np.testing.assert_allclose(again['optimizer'][name].numpy(), value.numpy(), rtol=0, atol=1e-6)
    full_val, resumed_val = (records(tmp_path / kind, 'val')[-1] for kind in ('full', 'resumed'))
    for key in ('loss', 'best_acc1', 'best_block', *(f'acc1_block{block}' for block in range(4))):
        assert resumed_val[key] == pytest.approx(full_val[key], abs=1e-6), key


@pytest.mark.slow
def test_resuming_on_other_frozen_weights_is_refused(probe_run, demo_subset, tmp_path, capsys):  # noqa: F811
    """The checkpoint holds the classifiers only: without the run's -pretrained they would meet other features."""
    code = main_linprobe.main(probe_args(demo_subset, tmp_path / 'out', '-resume', str(probe_run),
                                         opts=['LINPROBE.NUM_EPOCHS', str(EPOCHS + 1)]))
    assert code == 2
    message = capsys.readouterr().err
    assert 'was trained on other frozen weights than this run loaded (-pretrained none)' in message
    assert 'resume with the -pretrained of that run (' in message and not (tmp_path / 'out').exists()


BAD_INPUTS = {
    'unknown optimizer': (['-opts', 'LINPROBE.OPTIMIZER', 'lamb'],
                          "LINPROBE.OPTIMIZER must be one of ['adamw', 'sgd']"),
    'block beyond the model': (['-opts', 'LINPROBE.BLOCKS', '[0, 4]'],
                               'LINPROBE.BLOCKS [0, 4] for a model of MODEL.DEPTH 4 blocks: block index 4 is out'),
    'no LR': (['-opts', 'LINPROBE.BASE_LR', '0'], 'LINPROBE.BASE_LR must be positive'),
    'momentum above 1': (['-opts', 'LINPROBE.MOMENTUM', '1.5'], 'LINPROBE.MOMENTUM must lie in [0, 1]'),
    'no batch': (['-batch_size', '0'], 'LINPROBE.BATCH_SIZE must be positive'),
    'the shared epoch key': (['-opts', 'TRAIN.NUM_EPOCHS', '3'],
                             '-opts: linear probing takes TRAIN.NUM_EPOCHS from LINPROBE.NUM_EPOCHS'),
    'an EMA': (['-opts', 'TRAIN.MODEL_EMA', 'True'], 'TRAIN.MODEL_EMA: linear probing keeps no EMA'),
    'eval': (['-eval'], 'linear probing evaluates its classifiers every VALIDATE_FREQ epochs'),
    'missing weights': (['-pretrained', 'nowhere/checkpoint.pdparams'],
                        '-pretrained: file not found: nowhere/checkpoint.pdparams'),
    'unreadable weights': (['-pretrained', str(ROOT / 'README.md')], f'-pretrained: cannot read {ROOT / "README.md"}'),
    'missing resume': (['-resume', 'nowhere/checkpoint-epoch-1.pdparams'], '-resume: checkpoint not found'),
}


@pytest.mark.parametrize('ngpus', ['1', pytest.param('2', marks=pytest.mark.slow)])  # 2: spawned processes
@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_exits_2_naming_the_key_and_writes_nothing(case, ngpus, demo_subset, used_output,  # noqa: F811
                                                             capfd):
    """The earlier run's checkpoint-epoch-2 lies beyond this 1-epoch run: only the bad input stops it. (capfd:
    with 2 processes, what only a file's contents show is found, and printed, by the spawned processes.)"""
    flags, message = BAD_INPUTS[case]
    before = {path.name: path.read_bytes() for path in used_output.iterdir()}
    argv = probe_args(demo_subset, used_output, '-ngpus', ngpus, opts=['LINPROBE.NUM_EPOCHS', '1'])
    assert main_linprobe.main([*argv, *flags]) == 2  # a later flag wins, a second -opts adds to the first
    assert message in capfd.readouterr().err
    assert {path.name: path.read_bytes() for path in used_output.iterdir()} == before


@pytest.mark.slow
def test_two_processes(pretrained, demo_subset, tmp_path):  # noqa: F811
    """DataParallel over the classifiers alone (the encoder's frozen tensors take no part in the gradient sync)."""
    output = tmp_path / 'two'
    run([sys.executable, str(ROOT / 'main_linprobe.py'), '-ngpus', '2',
         *probe_args(demo_subset, output, '-pretrained', str(pretrained), opts=['LINPROBE.NUM_EPOCHS', '2'])])
    train, val = records(output, 'train'), records(output, 'val')
    assert [r['epoch'] for r in train] == [1, 2] and all(r['num_samples'] == 9 * 32 * 2 for r in train)
    assert all(r['num_samples'] == 125 for r in val) and val[-1]['best_acc1'] > 0.2
    assert '2 process(es)' in (output / 'log.txt').read_text()
    assert set(paddle.load(str(output / 'checkpoint-epoch-2.pdparams'))['model']) == CLASSIFIER_KEYS
