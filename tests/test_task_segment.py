"""The segmentation task (task_segment.py, main_segment.py): mmseg 0.11's loss against torch, training counts
against seg_metrics, a run through the job (checkpoints, metrics.jsonl, the per-class table, the curves), resume
after a kill (in-process, and a SIGKILL of two processes) to the same weights, -pretrained from a classification
file, evaluation identical on 1 and 2 processes, and bad input refused with the file named and nothing written."""
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as torch_F
from PIL import Image

import cli
import engine
import main_segment
import plot_metrics
import task_segment
from beit import CheckpointMismatchError, build_beit
from beit_seg import build_beit_upernet
from checkpoint import load_pretrained
from config import ConfigError, get_config, merge_opts, validate_config
from helpers import ENV, ROOT, assert_same_state, kill_during, killed_after_steps, records
from seg_inference import rescaled_shape
from seg_metrics import intersect_and_union
from seg_transforms import get_seg_val_transforms
from task_segment import (
    SEGMENTATION,
    SegmentationObjective,
    build_seg_optimizer,
    build_segmentation_objective,
    build_segmentor,
    get_seg_val_set,
    pixel_counts,
)
from tiny_seg_data import VAL_SIZES, write_seg_dataset

SEG_CONFIG = str(ROOT / 'configs' / 'beit_tiny_seg.yaml')
NUM_CLASSES = 4


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_seg_dataset(tmp_path_factory.mktemp('seg_data'))


def args(data, output, *flags, opts=()):
    return ['-cfg', SEG_CONFIG, '-data_path', str(data), '-output', str(output), *flags, *(['-opts', *opts] if opts
                                                                                            else [])]


def seg_config(*opts):
    config = get_config(SEG_CONFIG)
    merge_opts(config, list(opts))
    validate_config(config)
    return config


def objective(aux_weight=0.4):
    return SegmentationObjective(num_classes=NUM_CLASSES, ignore_index=255, aux_weight=aux_weight, settings=None)


# ---- the loss and the training counts ----------------------------------------------------------------------------


def torch_reference_loss(main, aux, labels, aux_weight):
    """mmseg 0.11: each head's logits resized to the labels, per-pixel cross entropy, the mean over every pixel."""
    def head_loss(logits):
        resized = torch_F.interpolate(torch.from_numpy(logits), size=labels.shape[-2:], mode='bilinear',
                                      align_corners=False)
        return torch_F.cross_entropy(resized, torch.from_numpy(labels), ignore_index=255, reduction='none').mean()
    return float(head_loss(main) + aux_weight * head_loss(aux))


def random_batch(seed=0):
    rng = np.random.default_rng(seed)
    main = rng.normal(0, 2, (2, NUM_CLASSES, 8, 10)).astype(np.float32)
    aux = rng.normal(0, 2, (2, NUM_CLASSES, 2, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, 32, 40)).astype(np.int64)
    labels[rng.random(labels.shape) < 0.3] = 255
    return main, aux, labels


def test_loss_equals_mmseg_averaging_over_all_pixels_in_torch():
    main, aux, labels = random_batch()
    loss, resized = objective().loss(paddle.to_tensor(main), paddle.to_tensor(aux), paddle.to_tensor(labels))
    assert float(loss) == pytest.approx(torch_reference_loss(main, aux, labels, 0.4), rel=1e-6)
    assert list(resized.shape) == [2, NUM_CLASSES, 32, 40]
    labelled_mean = float(torch_F.cross_entropy(  # torch's own 'mean' divides by the labelled pixels only
        torch_F.interpolate(torch.from_numpy(main), size=(32, 40), mode='bilinear', align_corners=False),
        torch.from_numpy(labels), ignore_index=255))
    main_only, _ = objective(aux_weight=0.0).loss(paddle.to_tensor(main), paddle.to_tensor(aux),
                                                  paddle.to_tensor(labels))
    assert abs(float(main_only) - labelled_mean) > 0.1 * labelled_mean


def test_training_counts_equal_seg_metrics_counts():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, NUM_CLASSES, (3, 17, 9))
    labels = rng.integers(0, NUM_CLASSES, (3, 17, 9))
    labels[rng.random(labels.shape) < 0.2] = 255
    counts = pixel_counts(paddle.to_tensor(pred), paddle.to_tensor(labels), NUM_CLASSES, 255)
    np.testing.assert_array_equal(counts.numpy(), intersect_and_union(pred, labels, num_classes=NUM_CLASSES))
    assert counts.dtype == paddle.float64


def test_a_training_step_gives_the_loss_and_the_counts_of_its_batch():
    model = build_beit_upernet(seg_config())
    model.train()
    rng = np.random.default_rng(2)
    images = paddle.to_tensor(rng.normal(0, 1, (2, 3, 32, 32)).astype(np.float32))
    labels = paddle.to_tensor(rng.integers(0, NUM_CLASSES, (2, 32, 32)))
    paddle.seed(0)
    loss, counts = objective()(model, (images, labels), engine.Amp())
    paddle.seed(0)
    main, aux = model(images)
    expected = torch_reference_loss(main.numpy(), aux.numpy(), labels.numpy(), 0.4)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert counts.shape == [objective().num_counts] and float(counts[0]) == pytest.approx(2 * expected, rel=1e-5)
    assert float(counts[-1]) == 2 and float(counts[1:-1].numpy()[3 * NUM_CLASSES:].sum()) == 2 * 32 * 32


# ---- the optimizer and the model ---------------------------------------------------------------------------------


def test_the_schedule_spans_the_run_and_the_lr_is_base_lr_unless_a_reference_batch_is_named():
    config = seg_config('TRAIN.NUM_EPOCHS', '3', 'TRAIN.BASE_LR', '1e-3', 'SEG.WARMUP_ITERS', '4')
    model = build_beit_upernet(config)
    _, scheduler, settings = build_seg_optimizer(config, model, steps_per_epoch=5, world_size=2)
    assert scheduler.max_iters == 15 and scheduler.base_lr == 1e-3
    assert set(settings) == {name for name, p in model.named_parameters() if not p.stop_gradient}
    scaled = seg_config('SEG.LINEAR_SCALED_LR', '16')
    scaled.defrost()
    scaled.TRAIN.LINEAR_SCALED_LR = scaled.SEG.LINEAR_SCALED_LR  # what cli does with the task's own key
    _, scheduler, _ = build_seg_optimizer(scaled, model, steps_per_epoch=5, world_size=2)
    assert scheduler.base_lr == pytest.approx(1e-3 * 4 * 2 / 16)


def test_batch_norm_becomes_sync_batch_norm_only_with_several_gpu_processes(monkeypatch):
    config = seg_config()

    def batch_norms(model):
        return {type(layer).__name__ for layer in model.sublayers() if 'BatchNorm' in type(layer).__name__}
    assert batch_norms(build_segmentor(config)) == {'BatchNorm2D'}
    monkeypatch.setattr(paddle.distributed, 'get_world_size', lambda: 2)
    assert batch_norms(build_segmentor(config)) == {'BatchNorm2D'}  # CPU processes: no sync_batch_norm kernel
    monkeypatch.setattr(paddle, 'get_device', lambda: 'gpu:0')
    assert batch_norms(build_segmentor(config)) == {'SyncBatchNorm'}


def test_pretrained_classification_weights_load_into_the_backbone(tmp_path):
    config = seg_config()
    classifier_config = seg_config('DATA.IMAGE_SIZE', '16')  # another grid: the tables are resampled
    classifier = build_beit(classifier_config)
    path = str(tmp_path / 'classifier.pdparams')
    paddle.save(classifier.state_dict(), path)
    model = build_beit_upernet(config)
    head_before = model.decode_head.conv_seg.weight.numpy().copy()
    notes, _ = load_pretrained(model, path, False, 'cubic')
    np.testing.assert_array_equal(model.backbone.blocks[1].mlp.fc1.weight.numpy(),
                                  classifier.blocks[1].mlp.fc1.weight.numpy())
    np.testing.assert_array_equal(model.decode_head.conv_seg.weight.numpy(), head_before)
    assert any('resampled' in note for note in notes) and any('freshly initialised: the fpn' in note for note in notes)


def test_a_segmentors_file_loads_whole_at_another_crop_and_other_classes_only_to_train(tmp_path):
    source = build_beit_upernet(seg_config('DATA.IMAGE_SIZE', '16'))
    path = str(tmp_path / 'segmentor.pdparams')
    paddle.save(source.state_dict(), path)
    model = build_beit_upernet(seg_config())
    notes, _ = load_pretrained(model, path, False, 'cubic', complete=True)
    assert any('resampled' in note for note in notes)
    for name, value in source.state_dict().items():
        if 'relative_position' not in name:
            np.testing.assert_array_equal(model.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    other_classes = build_beit_upernet(seg_config('SEG.NUM_CLASSES', '7'))
    with pytest.raises(CheckpointMismatchError, match='conv_seg'):
        load_pretrained(other_classes, path, False, 'cubic', complete=True)
    notes, _ = load_pretrained(other_classes, path, False, 'cubic')
    assert any('freshly initialised (another class count' in note for note in notes)
    np.testing.assert_array_equal(other_classes.decode_head.bottleneck.conv.weight.numpy(),
                                  source.decode_head.bottleneck.conv.weight.numpy())


# ---- runs through the job ----------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    output = tmp_path_factory.mktemp('seg_run') / 'run'
    assert main_segment.main(args(data, output)) == 0
    return output


def test_a_two_epoch_run_writes_checkpoints_metrics_and_the_class_table(trained):
    names = sorted(path.name for path in trained.iterdir())
    assert {'checkpoint-epoch-1.pdparams', 'checkpoint-epoch-2.pdparams', 'checkpoint-best.pdparams',
            'metrics.jsonl', 'log.txt', 'param_groups.json'} <= set(names)
    val = records(trained, 'val')
    assert [record['epoch'] for record in val] == [1, 2]
    for record in val:
        assert record['task'] == SEGMENTATION.name and record['num_samples'] == len(VAL_SIZES)
        assert 0.0 <= record['miou'] <= 1.0 and len(record['iou']) == NUM_CLASSES
        present = [iou for iou in record['iou'] if iou is not None]
        assert record['miou'] == pytest.approx(np.mean(present))
    assert all('miou' in record and 'loss' in record for record in records(trained, 'train'))
    log = (trained / 'log.txt').read_text()
    assert 'per class (%):' in log and 'epoch 2 val: loss' in log and 'freshly initialised' not in log


def test_plot_metrics_draws_the_miou_curve(trained):
    assert plot_metrics.main(['-output', str(trained)]) == 0
    assert (trained / 'curves.png').stat().st_size > 0
    tasks = plot_metrics.tasks_of(plot_metrics.read_metrics(str(trained / 'metrics.jsonl')), plot_metrics.find_tasks())
    _, curves = plot_metrics.curves_to_draw(plot_metrics.read_metrics(str(trained / 'metrics.jsonl')), tasks)
    assert ('val', 'miou') in {(curve.split, curve.key) for curve in curves}


def test_evaluation_of_a_checkpoint_gives_the_runs_last_miou(trained, data, tmp_path):
    output = tmp_path / 'eval'
    assert main_segment.main(args(data, output, '-eval', '-pretrained',
                                  str(trained / 'checkpoint-epoch-2.pdparams'))) == 0
    (evaluated,) = records(output, 'val')
    last = records(trained, 'val')[-1]
    assert (evaluated['miou'], evaluated['iou']) == (last['miou'], last['iou'])


def test_the_single_scale_view_is_the_data_pipelines_val_transform(data):
    config = seg_config('DATA.DATA_PATH', str(data))
    val_set = get_seg_val_set(config)
    objective = build_segmentation_objective(config, engine.World())
    for index in range(len(val_set)):
        image, labels = val_set[index]
        assert image.dtype == np.uint8 and labels.shape == image.shape[:2] == VAL_SIZES[index]
        resized, _ = get_seg_val_transforms(config)(*val_set.load(index))
        view = objective.views(image)(rescaled_shape(*image.shape[:2], config.SEG.IMG_SCALE))
        np.testing.assert_array_equal(view, resized[None])


def evaluated(trained, data, output, *opts):
    flags = ('-eval', '-pretrained', str(trained / 'checkpoint-epoch-2.pdparams'))
    assert main_segment.main(args(data, output, *flags, opts=list(opts))) == 0
    (record,) = records(output, 'val')
    return record


def test_multi_scale_and_flip_evaluation_makes_each_scale_from_the_original(trained, data, tmp_path):
    single = records(trained, 'val')[-1]
    one_ratio = evaluated(trained, data, tmp_path / 'one', 'SEG.MS_RATIOS', '[1.0]', 'SEG.SETR_MULTI_SCALE', 'False')
    assert (one_ratio['miou'], one_ratio['iou']) == (single['miou'], single['iou'])
    several = evaluated(trained, data, tmp_path / 'ms', 'SEG.MS_RATIOS', '[0.5, 1.0, 1.5]', 'SEG.FLIP', 'True')
    assert several['num_samples'] == len(VAL_SIZES) and several['iou'] != single['iou']


def test_a_run_killed_in_epoch_2_resumes_to_the_uninterrupted_weights(trained, data, tmp_path, monkeypatch):
    killed = tmp_path / 'killed'
    with killed_after_steps(monkeypatch, 3):  # the first step of epoch 2 (2 steps per epoch)
        main_segment.main(args(data, killed))
    assert not (killed / 'checkpoint-epoch-2.pdparams').exists()
    assert main_segment.main(args(data, killed, '-resume', str(killed / 'checkpoint-epoch-1.pdparams'))) == 0
    full, resumed = (paddle.load(str(folder / 'checkpoint-epoch-2.pdparams')) for folder in (trained, killed))
    assert full['model'].keys() == resumed['model'].keys()
    for name, value in full['model'].items():
        np.testing.assert_array_equal(resumed['model'][name].numpy(), value.numpy(), err_msg=name)
    assert records(killed, 'val')[-1]['miou'] == records(trained, 'val')[-1]['miou']


def test_a_run_from_classification_weights_logs_the_fit_and_evaluates_its_ema(data, tmp_path):
    path = tmp_path / 'classifier.pdparams'
    paddle.save(build_beit(seg_config('DATA.IMAGE_SIZE', '16')).state_dict(), str(path))
    output = tmp_path / 'run'
    assert main_segment.main(args(data, output, '-pretrained', str(path), opts=['TRAIN.NUM_EPOCHS', '1',
                                                                                'TRAIN.MODEL_EMA', 'True'])) == 0
    log = (output / 'log.txt').read_text()
    assert 'resampled blocks.0.attn.relative_position_bias_table' in log
    assert 'freshly initialised: the fpn' in log and 'val EMA: loss' in log
    (record,) = records(output, 'val')
    assert 0.0 <= record['ema_miou'] <= 1.0 and 'ema_aacc' in record


def test_evaluating_a_classification_file_is_refused(data, tmp_path, capsys):
    path = tmp_path / 'classifier.pdparams'
    paddle.save(build_beit(seg_config()).state_dict(), str(path))
    output = tmp_path / 'eval'
    assert main_segment.main(args(data, output, '-eval', '-pretrained', str(path))) == cli.EXIT_BAD_INPUT
    assert 'no segmentation weights' in capsys.readouterr().err and not output.exists()


# ---- bad input ---------------------------------------------------------------------------------------------------


def missing_annotation(root):
    os.remove(root / 'val_3.png')
    return root / 'val_3.png', []


def size_mismatch(root):
    Image.fromarray(np.zeros((10, 12), np.uint8), mode='L').save(root / 'train_2.png')
    return root / 'train_2.png', []


def label_151_of_150(root):
    labels = np.asarray(Image.open(root / 'val_1.png')).copy()
    labels[0, 0] = 151
    Image.fromarray(labels, mode='L').save(root / 'val_1.png')
    return root / 'val_1.png', ['SEG.NUM_CLASSES', '150']


@pytest.mark.parametrize('corrupt', [missing_annotation, size_mismatch, label_151_of_150])
def test_bad_data_is_refused_naming_the_file_with_nothing_written(corrupt, data, tmp_path, capsys):
    root = tmp_path / 'data'
    shutil.copytree(data, root)
    path, opts = corrupt(root)
    output = tmp_path / 'run'
    assert main_segment.main(args(root, output, opts=opts)) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(path) in err, err
    assert not output.exists()


@pytest.mark.parametrize('opts,key', [(['DATA.BATCH_SIZE_EVAL', '2'], 'DATA.BATCH_SIZE_EVAL'),
                                      (['TRAIN.GRAD_CLIP', '1.0'], 'TRAIN.GRAD_CLIP'),
                                      (['SEG.MS_RATIOS', '[0.5, -1.0]'], 'SEG.MS_RATIOS'),
                                      (['SEG.WARMUP_ITERS', '100'], 'SEG.WARMUP_ITERS'),
                                      (['TRAIN.LINEAR_SCALED_LR', '16'], 'SEG.LINEAR_SCALED_LR')])
def test_settings_the_task_cannot_use_are_refused_by_name(opts, key, data, tmp_path, capsys):
    output = tmp_path / 'run'
    assert main_segment.main(args(data, output, opts=opts)) == cli.EXIT_BAD_INPUT
    assert key in capsys.readouterr().err and not output.exists()


# ---- several processes -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluation_on_one_and_two_processes_gives_the_same_miou(trained, data, tmp_path):
    """An odd number of val images of different sizes, split 3 + 2 between the processes."""
    results = []
    for processes in ('1', '2'):
        output = tmp_path / f'eval_{processes}'
        cmd = [sys.executable, str(ROOT / 'main_segment.py'), *args(data, output, '-eval', '-ngpus', processes,
                                                                     '-pretrained',
                                                                     str(trained / 'checkpoint-epoch-2.pdparams'))]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        (record,) = records(output, 'val')
        results.append(record)
    one, two = results
    assert '2 process(es)' in (tmp_path / 'eval_2' / 'log.txt').read_text()
    assert one['num_samples'] == two['num_samples'] == len(VAL_SIZES)
    assert (one['miou'], one['aacc'], one['macc'], one['iou']) == (two['miou'], two['aacc'], two['macc'], two['iou'])
    assert one['loss'] == pytest.approx(two['loss'], rel=1e-12)


def script_command(data, output, processes, *flags):
    """main_segment.py on ``processes`` processes, 4 crops a step between them: 2 steps per epoch of the 8 training
    images, each logged."""
    batch = str(4 // int(processes))
    return [sys.executable, str(ROOT / 'main_segment.py'),
            *args(data, output, '-ngpus', processes, *flags, opts=['DATA.BATCH_SIZE', batch, 'REPORT_FREQ', '1'])]


def run_script(cmd):
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def epoch_checkpoints(folder):
    return sorted(path.name for path in folder.glob('checkpoint-epoch-*'))


@pytest.fixture(scope='module')
def sigkilled_runs(request, data, tmp_path_factory):
    """An uninterrupted run, and one SIGKILLed after the first step of epoch 2 then resumed from its epoch-1
    checkpoint, both on ``request.param`` processes: docs/runs.md promises bit-equal weights after a resume on a
    CPU, not across process counts (the ranks' shares of each batch would change)."""
    root = tmp_path_factory.mktemp(f'sigkill_{request.param}')
    full, killed = root / 'full', root / 'killed'
    run_script(script_command(data, full, request.param))
    kill_during(script_command(data, killed, request.param), killed / 'log.txt', 'epoch 2/2 step 1/2 ')
    assert epoch_checkpoints(killed) == ['checkpoint-epoch-1.pdparams']
    assert [record['epoch'] for record in records(killed, 'val')] == [1]
    run_script(script_command(data, killed, request.param, '-resume', str(killed / 'checkpoint-epoch-1.pdparams')))
    return full, killed


def untimed_train_records(folder):
    return [{key: value for key, value in record.items() if key != 'images_per_sec'}
            for record in records(folder, 'train')]


@pytest.mark.slow
@pytest.mark.parametrize('sigkilled_runs', ['1', '2'], indirect=True)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_weights_bit_for_bit(sigkilled_runs):
    full, killed = sigkilled_runs
    assert epoch_checkpoints(killed) == ['checkpoint-epoch-1.pdparams', 'checkpoint-epoch-2.pdparams']
    assert (killed / 'checkpoint-best.pdparams').exists()
    expected, resumed = (paddle.load(str(folder / 'checkpoint-epoch-2.pdparams')) for folder in sigkilled_runs)
    for part in ('model', 'optimizer', 'lr_scheduler'):
        assert_same_state(resumed[part], expected[part], part)
    assert resumed['global_step'] == expected['global_step'] == 4
    assert untimed_train_records(killed) == untimed_train_records(full)


@pytest.mark.slow
@pytest.mark.parametrize('sigkilled_runs', ['1', '2'], indirect=True)
def test_a_sigkilled_and_resumed_run_evaluates_as_the_uninterrupted_run(sigkilled_runs):
    assert [record['epoch'] for record in records(sigkilled_runs[1], 'val')] == [1, 2]
    expected, resumed = (records(folder, 'val')[-1] for folder in sigkilled_runs)
    for key in ('miou', 'iou', 'aacc', 'macc', 'loss'):
        assert resumed[key] == expected[key], key
    best = [paddle.load(str(folder / 'checkpoint-best.pdparams'))['best'] for folder in sigkilled_runs]
    assert best[0] == best[1]


def test_the_class_table_takes_the_names_of_the_datas_classes_txt(tmp_path):
    """The demo's canvases name their 11 classes in DATA_PATH/classes.txt; without the file a set that is not
    ADE20K's 150 classes is named by index; a file naming another count is refused, naming the file."""
    config = seg_config('DATA.DATA_PATH', str(tmp_path))
    assert task_segment._class_names(config) is None
    names = [f'class {index}' for index in range(config.SEG.NUM_CLASSES)]
    (tmp_path / 'classes.txt').write_text('\n'.join(names) + '\n')
    assert task_segment._class_names(config) == names
    (tmp_path / 'classes.txt').write_text('\n'.join(names[:-1]) + '\n')
    with pytest.raises(ConfigError, match=f'{tmp_path / "classes.txt"} names {len(names) - 1} classes'):
        task_segment._class_names(config)
    demo = get_config(str(ROOT / 'configs' / 'beit_tiny_seg_fashion.yaml'))
    demo.DATA.DATA_PATH = str(ROOT / 'data' / 'fashion_seg')
    assert task_segment._class_names(demo)[:2] == ['background', 'T-shirt/top']
