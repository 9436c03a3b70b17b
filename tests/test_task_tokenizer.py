"""VQ-KD tokenizer training through the job (task_tokenizer.py, main_tokenizer.py, vqkd_teacher.py): a run writes
checkpoints, metrics with the codebook usage and its curves; its checkpoint is a pre-training tokenizer as it is
(same ids); the logged usage is the count of the val split's distinct ids; a run killed in epoch 2 resumes to the
uninterrupted run's every tensor (in-process, and a SIGKILL of 1 and 2 processes), which an unsaved buffer breaks;
the optimizer leaves the codebook out; the teacher's features; bad settings refused by name with nothing written."""
import subprocess
import sys

import numpy as np
import paddle
import pytest

import cli
import main_tokenizer
import plot_metrics
import vqkd_model
from beit import build_beit
from clip_teacher import CLIPTeacher
from config import get_config
from datasets import get_dataloader
from helpers import ENV, ROOT, assert_same_state, kill_during, killed_after_steps, records
from task_tokenizer import (
    TOKENIZER_TRAINING,
    build_tokenizer_model,
    build_tokenizer_optimizer,
    get_tokenizer_val_set,
)
from tiny_data import write_dataset
from vqkd_teacher import BeitTeacher, build_beit_teacher
from vqkd_tokenizer import VQKDWeightsError, build_vqkd_tokenizer

TEACHER_CFG = str(ROOT / 'configs' / 'beit_tiny_patch4_32.yaml')  # 32 px, 4 px patches: an 8x8 grid
DEMO_CFG = str(ROOT / 'configs' / 'vqkd_tiny_fashion_mnist.yaml')
TOKENIZER = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=64, codebook_dim=8)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('vqkd_data')
    write_dataset(root / 'data', 16, 8)
    paddle.seed(1)
    paddle.save(build_beit(get_config(TEACHER_CFG)).state_dict(), str(root / 'teacher.pdparams'))
    return root


def opts(data, *extra):
    return ['-opts', 'DATA.IMAGE_SIZE', '32', 'MODEL.PATCH_SIZE', '4', 'VQKD.PATCH_SIZE', '4', 'VQKD.EMBED_DIM', '32',
            'VQKD.DEPTH', '1', 'VQKD.CODEBOOK_SIZE', '64', 'VQKD.CODEBOOK_DIM', '8', 'VQKD.TEACHER_CFG', TEACHER_CFG,
            'VQKD.TEACHER_WEIGHTS', str(data / 'teacher.pdparams'), 'DATA.BATCH_SIZE', '4', 'TRAIN.NUM_EPOCHS', '2',
            'REPORT_FREQ', '1', 'SAVE_FREQ', '1', *extra]


def args(data, output, *flags, extra=()):
    return ['-cfg', DEMO_CFG, '-data_path', str(data / 'data'), '-output', str(output), *flags, *opts(data, *extra)]


def config_of(data, *extra):
    return cli.parse_config(args(data, data / 'unused', extra=extra), 'test', TOKENIZER_TRAINING)


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    output = tmp_path_factory.mktemp('vqkd_run') / 'run'
    assert main_tokenizer.main(args(data, output)) == 0
    return output


def test_a_run_writes_checkpoints_and_the_codebook_usage_of_each_epoch(trained):
    assert {'checkpoint-epoch-1.pdparams', 'checkpoint-epoch-2.pdparams', 'checkpoint-best.pdparams',
            'metrics.jsonl', 'log.txt'} <= {path.name for path in trained.iterdir()}
    for split in ('train', 'val'):
        assert [record['epoch'] for record in records(trained, split)] == [1, 2]
        for record in records(trained, split):
            assert record['task'] == TOKENIZER_TRAINING.name
            assert 1 <= record['codes_used'] <= 64 and record['codebook_usage'] == record['codes_used'] / 64
            assert record['loss'] == pytest.approx(record['rec_loss'] + record['quant_loss'])
            assert record['rec_cosine'] == pytest.approx(1.0 - record['rec_loss'])
    log = (trained / 'log.txt').read_text()
    assert 'epoch 2 train: loss' in log and 'rec_cosine' in log
    assert 'epoch 2 val: loss' in log and 'codes_used' in log and 'codebook_usage' in log
    assert 'best val rec_cosine so far' in log


def test_plot_metrics_draws_the_codebook_usage(trained):
    assert plot_metrics.main(['-output', str(trained)]) == 0
    metrics = plot_metrics.read_metrics(str(trained / 'metrics.jsonl'))
    _, curves = plot_metrics.curves_to_draw(metrics, plot_metrics.tasks_of(metrics, plot_metrics.find_tasks()))
    assert {('train', 'codebook_usage'), ('val', 'codebook_usage')} <= {(c.split, c.key) for c in curves}


def val_images(config):
    val_set = get_tokenizer_val_set(config)
    return paddle.concat([images for images, _ in get_dataloader(config, val_set, 'val')])


def test_a_checkpoint_is_a_pretraining_tokenizer_with_the_training_models_ids(trained, data):
    """build_vqkd_tokenizer(checkpoint) gives the ids the training model gives, and the val split's distinct ids
    are the codes_used the run logged for it."""
    config = config_of(data)
    path = str(trained / 'checkpoint-epoch-2.pdparams')
    model = build_tokenizer_model(config)
    model.set_state_dict(paddle.load(path)['model'])
    model.eval()
    images = val_images(config)
    tokenizer = build_vqkd_tokenizer(path, mlp_ratio=4.0, **TOKENIZER)
    ids = tokenizer.get_codebook_indices(images).numpy()
    _, _, expected = model(images)
    np.testing.assert_array_equal(ids, expected.numpy())
    assert len(np.unique(ids)) == records(trained, 'val')[-1]['codes_used']
    with pytest.raises(VQKDWeightsError, match='quantize.embedding.weight'):
        build_vqkd_tokenizer(path, mlp_ratio=4.0, **{**TOKENIZER, 'codebook_size': 128})


def test_evaluating_a_checkpoint_gives_the_runs_last_val_numbers(trained, data, tmp_path):
    output = tmp_path / 'eval'
    assert main_tokenizer.main(args(data, output, '-eval', '-pretrained',
                                    str(trained / 'checkpoint-epoch-2.pdparams'))) == 0
    (evaluated,) = records(output, 'val')
    last = records(trained, 'val')[-1]
    for key in ('loss', 'rec_loss', 'quant_loss', 'codes_used'):
        assert evaluated[key] == last[key], key


def test_the_optimizer_trains_everything_but_the_codebook_with_unilms_decay_rule(data):
    config = config_of(data)
    model = build_tokenizer_model(config)
    optimizer, scheduler, settings = build_tokenizer_optimizer(config, model, steps_per_epoch=4, world_size=1)
    names = {name for name, _ in model.named_parameters()}
    assert set(settings) == names and not any(name.startswith('quantize') for name in names)
    assert settings['encoder.blocks.0.mlp.fc1.weight']['weight_decay'] == config.TRAIN.WEIGHT_DECAY
    for name in ('encoder.pos_embed', 'decoder.cls_token', 'encoder.blocks.0.attn.q_bias', 'decoder.fc_norm.weight',
                 'decode_task_layer.0.bias'):
        assert settings[name]['weight_decay'] == 0.0, name
    assert (optimizer._beta1, optimizer._beta2) == (0.9, 0.99)
    assert scheduler.get_lr() == pytest.approx(config.TRAIN.WARMUP_START_LR)


def test_the_beit_teacher_gives_the_final_patch_tokens_after_fc_norm_of_normalised_images(data):
    config = config_of(data)
    teacher = build_beit_teacher(config)
    assert isinstance(teacher, BeitTeacher) and teacher.feature_dim == 96 and not teacher.training
    assert all(param.stop_gradient for param in teacher.parameters())
    images = paddle.rand([2, 3, 32, 32])
    features = teacher.patch_features(images)
    assert features.shape == [2, 64, 96] and features.dtype == paddle.float32
    model = teacher.model
    mean = paddle.to_tensor(get_config(TEACHER_CFG).DATA.IMAGENET_MEAN).reshape([1, 3, 1, 1])
    std = paddle.to_tensor(get_config(TEACHER_CFG).DATA.IMAGENET_STD).reshape([1, 3, 1, 1])
    tokens, _ = model.run_blocks(model.patch_embed((images - mean) / std))
    np.testing.assert_allclose(features.numpy(), model.fc_norm(tokens[:, 1:]).numpy(), atol=1e-6)


# ---- resume ------------------------------------------------------------------------------------------------------


def killed_and_resumed(data, folder, monkeypatch):
    with killed_after_steps(monkeypatch, 5):  # the first step of epoch 2 (4 steps per epoch)
        main_tokenizer.main(args(data, folder))
    assert not (folder / 'checkpoint-epoch-2.pdparams').exists()
    assert main_tokenizer.main(args(data, folder, '-resume', str(folder / 'checkpoint-epoch-1.pdparams'))) == 0
    return paddle.load(str(folder / 'checkpoint-epoch-2.pdparams'))


def differing_tensors(resumed, expected) -> list:
    assert resumed.keys() == expected.keys()
    return [name for name, value in expected.items()
            if not np.array_equal(resumed[name].numpy(), value.numpy())]


def test_a_run_killed_in_epoch_2_resumes_to_the_uninterrupted_state(trained, data, tmp_path, monkeypatch):
    resumed = killed_and_resumed(data, tmp_path / 'killed', monkeypatch)
    full = paddle.load(str(trained / 'checkpoint-epoch-2.pdparams'))
    assert {'quantize.embedding.weight', 'quantize.cluster_size', 'quantize.embedding.initted'} <= set(full['model'])
    assert differing_tensors(resumed['model'], full['model']) == []
    for part in ('optimizer', 'lr_scheduler'):
        assert_same_state(resumed[part], full[part], part)
    assert records(tmp_path / 'killed', 'val')[-1]['codes_used'] == records(trained, 'val')[-1]['codes_used']


def test_a_buffer_left_out_of_the_checkpoint_breaks_the_resume(trained, data, tmp_path, monkeypatch):
    """The check above has teeth: with ``initted`` not saved, the resumed run redoes the k-means init."""
    register = paddle.nn.Layer.register_buffer

    def initted_not_saved(layer, name, tensor, persistable=True):
        return register(layer, name, tensor, persistable=persistable and name != 'initted')
    monkeypatch.setattr(vqkd_model.EmaCodebook, 'register_buffer', initted_not_saved)
    resumed = killed_and_resumed(data, tmp_path / 'killed', monkeypatch)
    full = paddle.load(str(trained / 'checkpoint-epoch-2.pdparams'))
    assert 'quantize.embedding.initted' not in resumed['model']
    expected = {name: value for name, value in full['model'].items() if name in resumed['model']}
    assert 'quantize.embedding.weight' in differing_tensors(resumed['model'], expected)


def script_command(data, output, processes, *flags):
    """main_tokenizer.py on ``processes`` processes, 4 images a step between them: 4 steps per epoch."""
    batch = str(4 // int(processes))
    return [sys.executable, str(ROOT / 'main_tokenizer.py'), *args(data, output, '-ngpus', processes, *flags,
                                                                   extra=('DATA.BATCH_SIZE', batch))]


def run_script(cmd):
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize('processes', ['1', '2'])
def test_a_sigkilled_run_resumes_to_the_uninterrupted_state_bit_for_bit(data, tmp_path, processes):
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    run_script(script_command(data, full, processes))
    kill_during(script_command(data, killed, processes), killed / 'log.txt', 'epoch 2/2 step 1/4 ')
    assert sorted(path.name for path in killed.glob('checkpoint-epoch-*')) == ['checkpoint-epoch-1.pdparams']
    run_script(script_command(data, killed, processes, '-resume', str(killed / 'checkpoint-epoch-1.pdparams')))
    expected, resumed = (paddle.load(str(folder / 'checkpoint-epoch-2.pdparams')) for folder in (full, killed))
    for part in ('model', 'optimizer', 'lr_scheduler'):
        assert_same_state(resumed[part], expected[part], part)
    assert resumed['global_step'] == expected['global_step'] == 8
    assert records(killed, 'val')[-1]['codes_used'] == records(full, 'val')[-1]['codes_used']
    # every process evaluated its share with its own codebook: all of them equal rank 0's saved one
    output = tmp_path / 'eval'
    assert main_tokenizer.main(args(data, output, '-eval', '-pretrained',
                                    str(full / 'checkpoint-epoch-2.pdparams'))) == 0
    (evaluated,) = records(output, 'val')
    logged = records(full, 'val')[-1]
    assert evaluated['codes_used'] == logged['codes_used']
    assert evaluated['loss'] == pytest.approx(logged['loss'], rel=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------------


def clip_teacher_file(data, *, patch_size: int) -> str:
    """A tiny CLIP image encoder at 32 px (output width 16) as load_clip_weights.py writes it."""
    path = data / f'clip_patch{patch_size}.pdparams'
    paddle.seed(2)
    clip = CLIPTeacher(input_resolution=32, patch_size=patch_size, width=64, layers=1, heads=1, output_dim=16)
    paddle.save(clip.state_dict(), str(path))
    return str(path)


def test_a_clip_teacher_trains_the_tokenizer_on_its_patch_features(data, tmp_path):
    output = tmp_path / 'run'
    clip = ['VQKD.TEACHER', 'clip', 'VQKD.TEACHER_WEIGHTS', clip_teacher_file(data, patch_size=4), 'TRAIN.NUM_EPOCHS',
            '1']
    assert main_tokenizer.main(args(data, output, extra=clip)) == 0
    [record] = records(output, 'val')
    assert 0 < record['codes_used'] <= 64
    config = config_of(data, *clip)
    assert build_tokenizer_model(config).decode_task_layer[-1].weight.shape[-1] == 16  # the teacher's width


def other_teacher(data):
    path = data / 'other_teacher.pdparams'
    other = get_config(TEACHER_CFG)
    other.MODEL.EMBED_DIM, other.MODEL.NUM_HEADS = 48, 3
    paddle.save(build_beit(other).state_dict(), str(path))
    return ['VQKD.TEACHER_WEIGHTS', str(path)]


@pytest.mark.parametrize('extra,named', [
    (['VQKD.PATCH_SIZE', '8'], 'VQKD.PATCH_SIZE'),  # a 4x4 grid against the teacher's 8x8
    (['VQKD.TEACHER_WEIGHTS', ''], 'VQKD.TEACHER_WEIGHTS'),
    (['VQKD.TEACHER_WEIGHTS', 'missing.pdparams'], 'missing.pdparams'),
    (['VQKD.TEACHER_CFG', ''], 'VQKD.TEACHER_CFG'),
    (['VQKD.TEACHER_CFG', 'configs/missing.yaml'], 'configs/missing.yaml'),
    (['VQKD.CODEBOOK_SIZE', '0'], 'VQKD.CODEBOOK_SIZE'),
    (['VQKD.EMA_DECAY', '1.0'], 'VQKD.EMA_DECAY'),
    (['VQKD.DECODER_DEPTH', '0'], 'VQKD.DECODER_DEPTH'),
    (['VQKD.TEACHER', 'dino'], 'VQKD.TEACHER'),
    (['TRAIN.MODEL_EMA', 'True'], 'TRAIN.MODEL_EMA'),
    (['AMP', 'True', 'AMP_LEVEL', 'O2'], 'AMP_LEVEL'),
    ('other_teacher', 'VQKD.TEACHER_WEIGHTS'),
    ('clip_patch8', 'VQKD.PATCH_SIZE'),  # the CLIP file's 4x4 grid against the tokenizer's 8x8
    ('clip_foreign', 'VQKD.TEACHER_WEIGHTS'),  # a BEiT file given as the CLIP teacher
])
def test_bad_settings_are_refused_by_name_with_nothing_written(extra, named, data, tmp_path, capsys):
    if isinstance(extra, str):
        extra = {'other_teacher': lambda: other_teacher(data),
                 'clip_patch8': lambda: ['VQKD.TEACHER', 'clip', 'VQKD.TEACHER_WEIGHTS',
                                         clip_teacher_file(data, patch_size=8)],
                 'clip_foreign': lambda: ['VQKD.TEACHER', 'clip']}[extra]()
    output = tmp_path / 'run'
    assert main_tokenizer.main(args(data, output, extra=extra)) == cli.EXIT_BAD_INPUT
    assert named in capsys.readouterr().err
    assert not output.exists()
