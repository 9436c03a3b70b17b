"""job.py in-process: bad input refused before any work with nothing written, the EMA starting from the loaded
weights, -amp on CPU, a diverged run stopping after its last good checkpoint."""
import json
import logging
import os
import random
import types

import numpy as np
import paddle
import pytest
from paddle.utils import unique_name

import cli
import datasets
import job
import main_single_gpu
import run_folder
from beit import build_beit, relative_position_index
from checkpoint import save_checkpoint
from config import get_config
from engine import NonFiniteLossError, World
from helpers import TINY_CONFIG, Killed
from optim import build_lr_scheduler, build_optimizer
from paddle_internals import LossScaler
from task_finetune import FINE_TUNING
from tiny_data import write_dataset

FAST = ['DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '8', 'TRAIN.NUM_EPOCHS', '2']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data'), num_train=24, num_val=11)


def args(data, output, *extra, opts=()):
    return ['-cfg', TINY_CONFIG, '-data_path', str(data), '-output', str(output), *extra, '-opts', *FAST, *opts]


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def other_architecture_checkpoint(path):
    config = get_config(TINY_CONFIG)
    config.MODEL.DEPTH = 2
    model = build_beit(config)
    scheduler = build_lr_scheduler(config, 1, 1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    save_checkpoint(str(path), model=model, optimizer=optimizer, lr_scheduler=scheduler,
                    grad_scaler=paddle.amp.GradScaler(enable=False), model_ema=None, epoch=1, global_step=1,
                    config=config)
    return path


def other_class_count_weights(path):
    config = get_config(TINY_CONFIG)
    config.MODEL.NUM_CLASSES = 5
    paddle.save(build_beit(config).state_dict(), str(path))
    return path


def empty_val_copy(data, tmp_path):
    copy = tmp_path / 'empty_val'
    copy.mkdir()
    (copy / 'train_list.txt').write_text(''.join(f'{data}/{line}' for line in
                                                 (data / 'train_list.txt').read_text().splitlines(True)))
    (copy / 'val_list.txt').write_text('')
    return copy


BAD_INPUTS = {
    'missing data path': (lambda data, tmp: ['-data_path', str(tmp / 'nowhere')], 'DATA.DATA_PATH not found'),
    'empty val list': (lambda data, tmp: ['-data_path', str(empty_val_copy(data, tmp))], 'no samples'),
    'missing resume file': (lambda data, tmp: ['-resume', str(tmp / 'gone.pdparams')], 'checkpoint not found'),
    'resume of another architecture': (
        lambda data, tmp: ['-resume', str(other_architecture_checkpoint(tmp / 'depth2.pdparams'))],
        'was saved for another architecture than this run (MODEL.DEPTH 2 there, 4 here)'),
    'pretrained of another architecture': (
        lambda data, tmp: ['-pretrained', str(other_architecture_checkpoint(tmp / 'depth2.pdparams'))],
        'missing from the checkpoint'),
    'checkpoints it would overwrite': (lambda data, tmp: [], 'would overwrite'),
    'eval with resume': (lambda data, tmp: ['-eval', '-resume', str(tmp / 'x.pdparams')], '-resume continues'),
    'eval without weights': (lambda data, tmp: ['-eval'], '-eval needs -pretrained WEIGHTS'),
    'eval of another class count': (
        lambda data, tmp: ['-eval', '-pretrained', str(other_class_count_weights(tmp / 'five.pdparams'))],
        'head.weight [96, 5] holds 5 classes, the model 10 classes (MODEL.NUM_CLASSES): evaluating it would '
        'evaluate a random head'),
}


def test_shared_memory_too_small_stops_the_run_before_it_starts(data, tmp_path, monkeypatch, capsys):
    """A stand-in /dev/shm with 1 MiB free: the loader's batches would not fit, so the run exits 2 naming /dev/shm
    before any output exists (instead of a worker's bus error mid-epoch)."""
    is_folder = os.path.isdir
    monkeypatch.setattr(datasets.os.path, 'isdir', lambda path: path == '/dev/shm' or is_folder(path))
    monkeypatch.setattr(datasets.os, 'statvfs', lambda path: types.SimpleNamespace(f_frsize=4096, f_blocks=16384,
                                                                                   f_bavail=256))
    output = tmp_path / 'out'
    code = main_single_gpu.main(args(data, output, opts=['DATA.NUM_WORKERS', '2', 'DATA.BATCH_SIZE_EVAL', '256']))
    assert code == cli.EXIT_BAD_INPUT
    assert '/dev/shm is too small for the data loader: 64 MiB (1 MiB free)' in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_work(case, data, used_output, tmp_path, capsys):
    make_flags, message = BAD_INPUTS[case]
    before = snapshot(used_output)
    code = main_single_gpu.main(args(data, used_output, *make_flags(data, tmp_path)))  # a later flag wins
    captured = capsys.readouterr()
    assert code == cli.EXIT_BAD_INPUT
    assert message in captured.err
    assert 'epoch 1' not in captured.out
    assert snapshot(used_output) == before


def test_ema_starts_from_the_pretrained_weights_with_index_buffers_untouched(data, tmp_path):
    config = get_config(TINY_CONFIG)
    paddle.seed(7)
    source = build_beit(config).state_dict()
    weights = tmp_path / 'weights.pdparams'
    paddle.save(source, str(weights))
    config = cli.parse_config(args(data, tmp_path / 'out', '-pretrained', str(weights),
                                   opts=['TRAIN.MODEL_EMA', 'True']), 'test')
    prepared = job.prepare(config, World(), logging.getLogger('test_job'), FINE_TUNING)
    assert isinstance(prepared.trainer.grad_scaler, LossScaler)  # Paddle's own stops float16 runs (numpy 2.4)
    ema = prepared.trainer.model_ema
    for name, value in source.items():
        np.testing.assert_array_equal(ema.state_dict()[name].numpy(), value.numpy(), err_msg=name)
        np.testing.assert_array_equal(prepared.model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    expected_index = relative_position_index(prepared.model.patch_embed.grid).reshape(-1)
    ema.update(prepared.model.state_dict())
    for block in ema.module.blocks:
        assert block.attn.relative_position_index.dtype == paddle.int64
        np.testing.assert_array_equal(block.attn.relative_position_index.numpy(), expected_index)
    assert not (tmp_path / 'out').exists()  # prepare writes nothing


@pytest.mark.parametrize('level', ['O1', 'O2'])
def test_amp_on_cpu_runs_to_the_end(level, data, tmp_path, capsys):
    output = tmp_path / 'amp'
    code = main_single_gpu.main(args(data, output, '-amp', opts=['AMP_LEVEL', level, 'TRAIN.MODEL_EMA', 'True']))
    assert code == 0
    log = (output / 'log.txt').read_text()
    assert log.count('AMP requested') == 1
    assert (output / 'checkpoint-epoch-2.pdparams').exists()
    records = [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['split'], r['epoch']) for r in records] == [('train', 1), ('val', 1), ('train', 2), ('val', 2)]
    for record in records:
        assert {'loss', 'acc1', 'acc5', 'num_samples', 'lr', 'images_per_sec'} <= set(record)
        assert np.isfinite(record['loss'])
    assert records[1]['num_samples'] == 11 and 'ema_acc1' in records[1]
    settings = json.loads((output / 'param_groups.json').read_text())
    assert settings['head.weight'] == {'lr_scale': 1.0, 'weight_decay': 0.05}
    capsys.readouterr()


def test_diverged_training_stops_after_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    real_train_one_epoch = job.train_one_epoch

    def diverge_in_epoch_two(trainer, loader, epoch, *rest):
        if epoch == 2:
            raise NonFiniteLossError('the training loss is nan at epoch 2 step 1')
        return real_train_one_epoch(trainer, loader, epoch, *rest)

    monkeypatch.setattr(job, 'train_one_epoch', diverge_in_epoch_two)
    output = tmp_path / 'diverged'
    code = main_single_gpu.main(args(data, output))
    assert code == cli.EXIT_TRAINING_FAILED
    message = capsys.readouterr().err
    assert 'nan at epoch 2' in message and str(output / 'checkpoint-epoch-1.pdparams') in message
    assert sorted(p.name for p in output.glob('checkpoint-epoch-*')) == ['checkpoint-epoch-1.pdparams']
    assert 'nan at epoch 2' in (output / 'log.txt').read_text()


def test_replaced_undecodable_images_are_counted_in_the_metrics(tmp_path, capsys):
    data = write_dataset(tmp_path / 'data', num_train=24, num_val=11)
    (data / 'train' / '3.png').write_bytes(b'not an image')
    (data / 'val' / '4.png').write_bytes(b'not an image either')
    output = tmp_path / 'out'
    code = main_single_gpu.main(args(data, output, opts=['TRAIN.NUM_EPOCHS', '1', 'DATA.BAD_IMAGE_POLICY', 'skip']))
    assert code == 0
    train, val = (json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines())
    assert (train['bad_images'], val['bad_images']) == (1, 1)
    assert val['num_samples'] == 11
    assert 'undecodable images were replaced' in (output / 'log.txt').read_text()
    capsys.readouterr()


def _val_record(output):
    return [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()][-1]


@pytest.mark.parametrize('backend, tolerance', [('inference', 1e-5), ('inference_bf16', 2e-2)])
def test_eval_backends_give_the_dygraph_metrics(backend, tolerance, data, tmp_path, capsys):
    """-eval through the exported model in Paddle Inference scores the weights as the dygraph model does."""
    if backend == 'inference_bf16' and not paddle.base.core.supports_bfloat16():
        pytest.skip('this CPU has no bfloat16 support')
    weights = tmp_path / 'weights.pdparams'
    model = build_beit(get_config(TINY_CONFIG))
    model.set_state_dict({name: paddle.randn(value.shape) * 0.5 for name, value in model.state_dict().items()})
    paddle.save(model.state_dict(), str(weights))
    for name, opts in (('dygraph', []), (backend, ['EVAL_BACKEND', backend])):
        assert main_single_gpu.main(args(data, tmp_path / name, '-eval', '-pretrained', str(weights), opts=opts)) == 0
    expected, record = _val_record(tmp_path / 'dygraph'), _val_record(tmp_path / backend)
    assert record['num_samples'] == expected['num_samples'] == 11
    assert record['loss'] == pytest.approx(expected['loss'], rel=tolerance)
    assert 'Paddle Inference' in (tmp_path / backend / 'log.txt').read_text()
    capsys.readouterr()


@pytest.mark.slow  # a whole run under paddle.jit.to_static: ~5 s on 2 cores
def test_to_static_training_runs_to_the_end(data, tmp_path, capsys):
    output = tmp_path / 'static'
    assert main_single_gpu.main(args(data, output, opts=['MODEL.TO_STATIC', 'True', 'TRAIN.MODEL_EMA', 'True'])) == 0
    records = [json.loads(line) for line in (output / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['split'], r['epoch']) for r in records] == [('train', 1), ('val', 1), ('train', 2), ('val', 2)]
    assert all(np.isfinite(r['loss']) for r in records)
    assert (output / 'checkpoint-epoch-2.pdparams').exists()
    capsys.readouterr()


def checkpoint_files(folder):
    return sorted(path.name for path in folder.glob('checkpoint-*.pdparams'))


def val_records(folder):
    lines = (folder / 'metrics.jsonl').read_text().splitlines()
    return [record for record in map(json.loads, lines) if record['split'] == 'val']


@pytest.mark.parametrize('ema', [False, True])
def test_retention_keeps_the_newest_k_and_the_best(ema, data, tmp_path, capsys):
    output = tmp_path / 'run'
    opts = ['KEEP_CHECKPOINTS', '2', 'TRAIN.NUM_EPOCHS', '4', 'TRAIN.MODEL_EMA', str(ema), 'TRAIN.BASE_LR', '3e-3']
    assert main_single_gpu.main(args(data, output, opts=opts)) == 0
    assert checkpoint_files(output) == ['checkpoint-best.pdparams', 'checkpoint-epoch-3.pdparams',
                                        'checkpoint-epoch-4.pdparams']
    metric, weights = ('ema_acc1', 'EMA') if ema else ('acc1', 'model')
    records = val_records(output)
    best = max(records, key=lambda record: record[metric])  # the first of equal ones
    saved = paddle.load(str(output / 'checkpoint-best.pdparams'))
    assert saved['epoch'] == best['epoch']
    assert saved['best'] == {'acc1': best[metric], 'epoch': best['epoch'], 'weights': weights}
    assert f'by the val acc1 of the {weights} weights' in capsys.readouterr().out


def test_retention_after_a_kill_between_save_and_deletion(data, tmp_path, monkeypatch):
    output = tmp_path / 'run'
    opts = ['KEEP_CHECKPOINTS', '2', 'TRAIN.NUM_EPOCHS', '4']

    def killed_before_deleting(written, keep):
        if len(written) > keep:
            raise Killed
        return written

    with monkeypatch.context() as patched:
        patched.setattr(run_folder, 'keep_newest', killed_before_deleting)
        with pytest.raises(Killed):
            main_single_gpu.main(args(data, output, opts=opts))
    assert 'checkpoint-epoch-3.pdparams' in checkpoint_files(output)  # saved, nothing deleted
    best_before = paddle.load(str(output / 'checkpoint-best.pdparams'))['best']
    assert main_single_gpu.main(args(data, output, '-resume', str(output), opts=opts)) == 0
    assert checkpoint_files(output) == ['checkpoint-best.pdparams', 'checkpoint-epoch-3.pdparams',
                                        'checkpoint-epoch-4.pdparams']
    best = paddle.load(str(output / 'checkpoint-best.pdparams'))['best']
    records = val_records(output)
    assert best['acc1'] == max(record['acc1'] for record in records) >= best_before['acc1']


def accuracies(values, monkeypatch):
    """job.evaluate with its acc1 replaced by the next of ``values``: the run's best follows them, not the data."""
    real_evaluate, given = job.evaluate, iter(values)

    def forced(*args):
        return {**real_evaluate(*args), 'acc1': next(given)}

    monkeypatch.setattr(job, 'evaluate', forced)


def test_a_kill_between_the_epoch_checkpoint_and_the_best_file_is_repaired_on_resume(data, tmp_path, monkeypatch):
    output = tmp_path / 'run'
    real_publish_copy = run_folder.publish_copy

    def killed_before_publishing_epoch_2(source, path):
        if source.endswith('checkpoint-epoch-2.pdparams'):
            raise Killed
        real_publish_copy(source, path)

    with monkeypatch.context() as patched:
        accuracies([0.1, 0.2], patched)  # rising: epoch 2 is the best
        patched.setattr(run_folder, 'publish_copy', killed_before_publishing_epoch_2)
        with pytest.raises(Killed):
            main_single_gpu.main(args(data, output))
    assert paddle.load(str(output / 'checkpoint-epoch-2.pdparams'))['best']['epoch'] == 2
    assert paddle.load(str(output / 'checkpoint-best.pdparams'))['epoch'] == 1  # the window the kill left
    accuracies([0.0], monkeypatch)  # the resumed epoch 3 is no better
    assert main_single_gpu.main(args(data, output, '-resume', str(output), opts=['TRAIN.NUM_EPOCHS', '3'])) == 0
    recorded = paddle.load(str(output / 'checkpoint-epoch-3.pdparams'))['best']
    best = paddle.load(str(output / 'checkpoint-best.pdparams'))
    assert recorded == {'acc1': 0.2, 'epoch': 2, 'weights': 'model'}
    assert (best['epoch'], best['best']) == (2, recorded)
    assert (output / 'checkpoint-best.pdparams').read_bytes() == (output / 'checkpoint-epoch-2.pdparams').read_bytes()


def test_a_fresh_run_never_replaces_another_runs_best(data, tmp_path, capsys):
    output = tmp_path / 'run'
    output.mkdir()
    (output / 'checkpoint-best.pdparams').write_bytes(b'an earlier best')
    assert main_single_gpu.main(args(data, output)) == cli.EXIT_BAD_INPUT
    assert "already holds another run's checkpoints (checkpoint-best.pdparams" in capsys.readouterr().err
    assert (output / 'checkpoint-best.pdparams').read_bytes() == b'an earlier best'


def test_a_resume_without_o2_saves_the_weights_it_trains(data, tmp_path, capsys):
    """An AMP O2 checkpoint's optimizer holds float32 master weights by parameter name, which AdamW updates only
    under O2 while Paddle's state dict keeps returning them. Resumed without O2 for 3 steps, the run must save
    and average into its EMA the weights it trains (as the uninterrupted run does), not the masters frozen at
    the resume."""
    opts = ['TRAIN.MODEL_EMA', 'True']
    whole = tmp_path / 'whole'
    assert main_single_gpu.main(args(data, whole, opts=opts)) == 0  # 2 epochs of 3 steps
    checkpoint = paddle.load(str(whole / 'checkpoint-epoch-1.pdparams'))
    with unique_name.guard():  # the run's parameter names
        names = {name: param.name for name, param in build_beit(get_config(TINY_CONFIG)).named_parameters()}
    checkpoint['optimizer']['master_weights'] = {names[name]: value for name, value in checkpoint['model'].items()
                                                 if name in names}
    o2_checkpoint = tmp_path / 'o2.pdparams'
    paddle.save(checkpoint, str(o2_checkpoint))
    resumed = tmp_path / 'resumed'
    assert main_single_gpu.main(args(data, resumed, '-resume', str(o2_checkpoint), opts=opts)) == 0
    expected = paddle.load(str(whole / 'checkpoint-epoch-2.pdparams'))
    saved = paddle.load(str(resumed / 'checkpoint-epoch-2.pdparams'))
    for key in ('model', 'model_ema'):
        for name, value in expected[key].items():
            np.testing.assert_array_equal(saved[key][name].numpy(), value.numpy(), err_msg=f'{key} {name}')
    assert 'master_weights' not in saved['optimizer']
    assert "this run is not O2: its optimizer's float32 master weights are dropped" in (resumed / 'log.txt').read_text()
    capsys.readouterr()


class _SeedRecorder:
    """A stand-in for the objective, the train set and its sampler: records what _start_epoch hands it."""

    def __init__(self, received: dict, name: str):
        self.received, self.name = received, name

    def reseed(self, seed):
        self.received[self.name] = seed

    def set_epoch(self, epoch):
        self.received['sampler epoch'] = epoch


def _epoch_start(seed: int, rank: int, epoch: int) -> dict:
    """What job._start_epoch gives a stand-in job's receivers, and the first draws of the global generators."""
    received = {}
    stand_in = types.SimpleNamespace(
        config=types.SimpleNamespace(SEED=seed), world=World(rank=rank, size=2, local_size=2),
        trainer=types.SimpleNamespace(objective=_SeedRecorder(received, 'objective')),
        train=job.Data(_SeedRecorder(received, 'dataset'),
                       types.SimpleNamespace(batch_sampler=_SeedRecorder(received, 'sampler'))))
    job._start_epoch(stand_in, epoch)
    received['global draws'] = (random.random(), float(np.random.random()), paddle.rand([]).item())
    return received


def test_a_two_epoch_run_draws_from_seed_epoch_and_rank():
    """Epochs 1 and 2 of a run, on ranks 0 and 1, for SEED 0 and 1: each start hands the objective and the dataset
    one seed and the sampler the epoch, and seeds the global generators (augmentations, drop path); the 8 starts
    differ from one another and repeat exactly for the same (SEED, epoch, rank), as a resumed run needs."""
    starts = {(seed, rank, epoch): _epoch_start(seed, rank, epoch)
              for seed in (0, 1) for rank in (0, 1) for epoch in (1, 2)}
    for (seed, rank, epoch), received in starts.items():
        assert received['objective'] == received['dataset'] and received['sampler epoch'] == epoch
        assert _epoch_start(seed, rank, epoch) == received
    assert len({received['dataset'] for received in starts.values()}) == 8
    assert len({received['global draws'] for received in starts.values()}) == 8


def val_epochs(folder, name='metrics.jsonl'):
    return [json.loads(line)['epoch'] for line in (folder / name).read_text().splitlines()
            if json.loads(line)['split'] == 'val']


def test_resume_without_output_continues_in_the_resumed_folder_and_logs_changed_keys(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'run'
    assert main_single_gpu.main(args(data, run)) == 0
    resume = ['-cfg', TINY_CONFIG, '-data_path', str(data), '-resume', str(run), '-opts', *FAST,
              'TRAIN.NUM_EPOCHS', '3', 'REPORT_FREQ', '5']
    assert main_single_gpu.main(resume) == 0
    assert not (tmp_path / 'output').exists()
    assert checkpoint_files(run)[-1] == 'checkpoint-epoch-3.pdparams' and val_epochs(run) == [1, 2, 3]
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['task'] for line in lines] == ['fine-tuning'] * 6  # plot_metrics draws its curves
    assert "checkpoint's (key: checkpoint -> this run):\n  REPORT_FREQ: 20 -> 5\n  TRAIN.NUM_EPOCHS: 2 -> 3\n" in \
        (run / 'log.txt').read_text()


def test_a_run_killed_before_its_first_epoch_checkpoint_can_be_resumed_and_says_how(data, tmp_path, monkeypatch,
                                                                                      capsys):
    run, opts = tmp_path / 'run', ['SAVE_FREQ', '10', 'TRAIN.NUM_EPOCHS', '3']
    real_train_one_epoch = job.train_one_epoch

    def killed_in_epoch_3(trainer, loader, epoch, *rest):
        if epoch == 3:
            raise Killed
        return real_train_one_epoch(trainer, loader, epoch, *rest)

    with monkeypatch.context() as patched:
        accuracies([0.1, 0.2], patched)
        patched.setattr(job, 'train_one_epoch', killed_in_epoch_3)
        with pytest.raises(Killed):
            main_single_gpu.main(args(data, run, opts=opts))
    assert checkpoint_files(run) == ['checkpoint-best.pdparams']
    capsys.readouterr()
    assert main_single_gpu.main(args(data, run, opts=opts)) == cli.EXIT_BAD_INPUT
    assert f'that run died before its first epoch checkpoint), which a new run would overwrite: continue that run ' \
           f'with -resume {run}' in capsys.readouterr().err
    assert main_single_gpu.main(args(data, run, '-resume', str(run), opts=opts)) == 0
    assert f'resumed from {run}/checkpoint-best.pdparams: 2 epochs' in (run / 'log.txt').read_text()
    assert checkpoint_files(run) == ['checkpoint-best.pdparams', 'checkpoint-epoch-3.pdparams']
    assert val_epochs(run) == [1, 2, 3]


def test_a_resume_from_an_older_checkpoint_continues_in_place_and_keeps_what_it_supersedes(data, tmp_path):
    run = tmp_path / 'run'
    assert main_single_gpu.main(args(data, run, opts=['TRAIN.NUM_EPOCHS', '3'])) == 0
    first = {name: (run / name).read_bytes() for name in checkpoint_files(run)}
    assert main_single_gpu.main(args(data, run, '-resume', str(run / 'checkpoint-epoch-1.pdparams'),
                                     opts=['TRAIN.NUM_EPOCHS', '3'])) == 0
    (aside,) = run.glob('superseded-*')
    moved = {path.name: path.read_bytes() for path in aside.iterdir()}
    assert {'checkpoint-epoch-2.pdparams', 'checkpoint-epoch-3.pdparams'} <= set(moved)
    assert all(first[name] == moved[name] for name in moved)  # nothing lost
    assert val_epochs(run) == [1, 2, 3] and val_epochs(run, 'metrics-superseded.jsonl') == [2, 3]
    again, before = (paddle.load(str(path))['model'] for path in (run / 'checkpoint-epoch-3.pdparams',
                                                                   aside / 'checkpoint-epoch-3.pdparams'))
    for name, value in before.items():  # the repeated epochs are the same epochs
        np.testing.assert_array_equal(again[name].numpy(), value.numpy(), err_msg=name)
    best = paddle.load(str(run / 'checkpoint-best.pdparams'))
    assert best['epoch'] == best['best']['epoch']


def test_output_naming_a_file_exits_2_and_leaves_it_alone(data, tmp_path, capsys):
    path = tmp_path / 'notes.txt'
    path.write_text('mine')
    assert main_single_gpu.main(args(data, path)) == cli.EXIT_BAD_INPUT
    assert f'-output {path} is a file' in capsys.readouterr().err
    assert path.read_text() == 'mine'
