"""checkpoint.py: complete round trips, refusal of missing, foreign or mismatched files, -pretrained sources."""
import numpy as np
import paddle
import pytest
from paddle.amp.auto_cast import amp_initialize

from beit import CheckpointMismatchError, build_beit
from beit_pretrain import build_beit_pretrain
from checkpoint import (
    CheckpointError,
    check_exact_fit,
    load_pretrained,
    load_training_checkpoint,
    save_checkpoint,
    weights_digest,
)
from config import get_config
from gpu_runtime import O2_FLOAT32_LAYERS
from helpers import ROOT, TINY_CONFIG
from model_ema import ModelEma
from optim import build_lr_scheduler, build_optimizer, float32_weights
from run_folder import checkpoint_path


def tiny(**model):
    config = get_config(TINY_CONFIG)
    for key, value in model.items():
        config.MODEL[key] = value
    paddle.seed(0)
    return config, build_beit(config)


def write_checkpoint(path, config, model, epoch=3, with_ema=True):
    scheduler = build_lr_scheduler(config, steps_per_epoch=4, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    ema = ModelEma(model, 0.5) if with_ema else None
    if ema is not None:
        ema.module.head.bias.set_value(paddle.full_like(ema.module.head.bias, 7.0))
    save_checkpoint(str(path), model=model, optimizer=optimizer, lr_scheduler=scheduler,
                    grad_scaler=paddle.amp.GradScaler(enable=False), model_ema=ema, epoch=epoch,
                    global_step=epoch * 4, config=config)
    return ema


def test_round_trip_holds_everything_a_resumed_run_needs(tmp_path):
    config, model = tiny()
    path = checkpoint_path(str(tmp_path), 3)
    write_checkpoint(path, config, model)
    checkpoint = load_training_checkpoint(path)
    assert {'model', 'optimizer', 'lr_scheduler', 'grad_scaler', 'model_ema', 'epoch', 'global_step',
            'config'} <= set(checkpoint)
    assert (checkpoint['epoch'], checkpoint['global_step']) == (3, 12)
    assert checkpoint['config'] == config.dump()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(checkpoint['model'][name].numpy(), value.numpy())
    assert not list(tmp_path.glob('*.tmp*'))


def o2_style_optimizer(config, model):
    """An optimizer whose state holds float32 master weights that differ from the parameters, as under AMP O2:
    the model's parameters are cast as decorate(level='O2') casts them on a GPU (amp_initialize, what it runs
    after its device check: bfloat16, the bias tables float32), and the master weights of the half-precision
    ones enter through the optimizer's own set_state_dict, the way a resumed O2 run loads them."""
    amp_initialize(models=[model], dtype='bfloat16', excluded_layers=list(O2_FLOAT32_LAYERS))
    scheduler = build_lr_scheduler(config, steps_per_epoch=4, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    masters = {param.name: param.astype('float32') + 1e-3 * (index + 1)
               for index, param in enumerate(model.parameters()) if param.dtype == paddle.bfloat16}
    optimizer.set_state_dict({'master_weights': masters, 'LR_Scheduler': scheduler.state_dict()})
    return optimizer, scheduler, masters


def test_an_o2_checkpoint_holds_the_float32_master_weights(tmp_path):
    config, model = tiny()
    optimizer, scheduler, masters = o2_style_optimizer(config, model)
    path = str(tmp_path / 'o2.pdparams')
    save_checkpoint(path, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                    grad_scaler=paddle.amp.GradScaler(enable=False), model_ema=None, epoch=1, global_step=4,
                    config=config, o2=True)
    saved = load_training_checkpoint(path)['model']
    parameters = dict(model.named_parameters())
    assert set(saved) == set(model.state_dict())
    assert model.blocks[0].attn.relative_position_bias_table.dtype == paddle.float32  # kept float32: no master
    for name, value in saved.items():
        param = parameters.get(name)
        expected = masters[param.name] if param is not None and param.name in masters else model.state_dict()[name]
        assert value.dtype == paddle.float32 if expected.is_floating_point() else value.dtype == expected.dtype
        np.testing.assert_array_equal(value.numpy(), expected.astype(value.dtype).numpy(), err_msg=name)
    fresh = build_beit(config)
    load_pretrained(fresh, path, use_ema=False, rel_pos_interp='cubic')  # what -pretrained, -eval and export read
    np.testing.assert_array_equal(fresh.head.weight.numpy(), masters[model.head.weight.name].numpy())


def test_master_weights_count_only_under_o2_and_only_for_half_precision_parameters():
    """A state dict keeps returning master weights it was given (a resumed O2 checkpoint) that AdamW no longer
    updates: outside O2 they are ignored, and so are master weights of a float32 parameter."""
    config, model = tiny()
    scheduler = build_lr_scheduler(config, steps_per_epoch=4, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    stale = {param.name: param + 1.0 for param in model.parameters()}
    optimizer.set_state_dict({'master_weights': stale, 'LR_Scheduler': scheduler.state_dict()})
    assert 'master_weights' in optimizer.state_dict()
    for o2 in (False, True):
        weights = float32_weights(model, optimizer, o2=o2)
        for name, value in model.state_dict().items():
            np.testing.assert_array_equal(weights[name].numpy(), value.numpy(), err_msg=f'{name} o2={o2}')


def test_float32_weights_cast_reduced_precision_tensors():
    config, model = tiny()
    scheduler = build_lr_scheduler(config, steps_per_epoch=4, world_size=1)
    optimizer, _ = build_optimizer(config, model, scheduler)
    model.head.bias.set_value(paddle.full_like(model.head.bias, 0.1))
    model.head.to(dtype='bfloat16')
    weights = float32_weights(model, optimizer, o2=False)
    assert weights['head.bias'].dtype == paddle.float32
    np.testing.assert_allclose(weights['head.bias'].numpy(), 0.1, rtol=1e-2)
    assert weights['blocks.0.attn.relative_position_bias_table'].dtype == paddle.float32


def test_foreign_or_bare_files_are_not_training_checkpoints(tmp_path):
    _, model = tiny()
    bare = tmp_path / 'bare.pdparams'
    paddle.save(model.state_dict(), str(bare))
    with pytest.raises(CheckpointError, match='not a training checkpoint'):
        load_training_checkpoint(str(bare))
    junk = tmp_path / 'junk.pdparams'
    junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='cannot read'):
        load_training_checkpoint(str(junk))


def test_another_architecture_is_refused_for_resume(tmp_path):
    _, model = tiny()
    _, deeper = tiny(DEPTH=5)
    with pytest.raises(CheckpointMismatchError, match='another architecture'):
        check_exact_fit(deeper.state_dict(), model, 'x.pdparams')
    _, wider = tiny(EMBED_DIM=48)
    with pytest.raises(CheckpointMismatchError, match='other shape'):
        check_exact_fit(wider.state_dict(), model, 'x.pdparams')


@pytest.mark.parametrize('source', ['bare', 'training', 'training_ema'])
def test_pretrained_reads_bare_files_and_training_checkpoints(tmp_path, source):
    config, trained = tiny()
    path = tmp_path / 'weights.pdparams'
    ema = None
    if source == 'bare':
        paddle.save(trained.state_dict(), str(path))
    else:
        ema = write_checkpoint(path, config, trained, epoch=5)
    paddle.seed(1)
    model = build_beit(config)
    notes, epoch = load_pretrained(model, str(path), use_ema=source == 'training_ema', rel_pos_interp='cubic')
    expected = (ema if source == 'training_ema' else trained).state_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[name].numpy())
    assert epoch == (None if source == 'bare' else 5)
    assert notes == []


def test_pretrained_drops_a_head_of_another_class_count_and_refuses_other_models(tmp_path):
    _, trained = tiny(NUM_CLASSES=1000)
    path = tmp_path / 'in1k.pdparams'
    paddle.save(trained.state_dict(), str(path))
    _, model = tiny()
    notes, _ = load_pretrained(model, str(path), use_ema=False, rel_pos_interp='cubic')
    assert any('head.weight' in note for note in notes)
    np.testing.assert_array_equal(model.blocks[0].mlp.fc1.weight.numpy(), trained.blocks[0].mlp.fc1.weight.numpy())
    _, other = tiny(EMBED_DIM=48)
    with pytest.raises(CheckpointMismatchError):
        load_pretrained(other, str(path), use_ema=False, rel_pos_interp='cubic')
    with pytest.raises(CheckpointError, match='no EMA'):
        load_pretrained(model, str(path), use_ema=True, rel_pos_interp='cubic')
    with pytest.raises(CheckpointError, match='not found'):
        load_pretrained(model, str(tmp_path / 'missing.pdparams'), use_ema=False, rel_pos_interp='cubic')


def test_a_pretraining_checkpoint_starts_fine_tuning(tmp_path):
    """Our MIM training checkpoint as -pretrained: MIM-only tensors dropped, the shared table in every block."""
    pretrain_config = get_config(str(ROOT / 'configs' / 'beit_tiny_pretrain_fashion_mnist.yaml'))
    paddle.seed(0)
    pretrained = build_beit_pretrain(pretrain_config)
    table = pretrained.rel_pos_bias.relative_position_bias_table
    table.set_value(paddle.randn(table.shape))  # a trained-looking table (it starts at zero)
    scheduler = build_lr_scheduler(pretrain_config, steps_per_epoch=4, world_size=1)
    optimizer, _ = build_optimizer(pretrain_config, pretrained, scheduler)
    path = checkpoint_path(str(tmp_path), 20)
    save_checkpoint(path, model=pretrained, optimizer=optimizer, lr_scheduler=scheduler,
                    grad_scaler=paddle.amp.GradScaler(enable=False), model_ema=None, epoch=20, global_step=80,
                    config=pretrain_config)
    model = build_beit(get_config(str(ROOT / 'configs' / 'beit_tiny_fashion_mnist.yaml')))
    fresh_fc_norm = model.fc_norm.weight.numpy().copy()
    notes, epoch = load_pretrained(model, path, use_ema=False, rel_pos_interp='cubic')
    assert epoch == 20
    assert notes[0] == 'copied the shared relative position bias into 4 blocks'
    assert 'ignored norm.weight, norm.bias (the model pools with fc_norm)' in notes
    assert 'not in the checkpoint, freshly initialised: fc_norm.weight, fc_norm.bias, head.weight, head.bias' in notes
    for block, trained in zip(model.blocks, pretrained.blocks):
        np.testing.assert_array_equal(block.attn.relative_position_bias_table.numpy(), table.numpy())
        np.testing.assert_array_equal(block.mlp.fc1.weight.numpy(), trained.mlp.fc1.weight.numpy())
    np.testing.assert_array_equal(model.fc_norm.weight.numpy(), fresh_fc_norm)
    assert not any(name.startswith(('mask_token', 'lm_head', 'rel_pos_bias')) for name in model.state_dict())


def test_weights_digest_follows_every_value():
    """-resume of a partly frozen model compares the frozen part's digest: equal weights, equal digests."""
    (_, first), (_, second) = tiny(), tiny()
    assert weights_digest(first) == weights_digest(second)
    second.blocks[3].mlp.fc2.bias.set_value(second.blocks[3].mlp.fc2.bias + 1e-7)
    assert weights_digest(first) != weights_digest(second)
