"""seg_optim.py against unilm's LayerDecayOptimizerConstructor and mmcv's poly schedule with linear warm-up, both
restated here from their sources (beit/semantic_segmentation/mmcv_custom/layer_decay_optimizer_constructor.py;
mmcv 1.3's LrUpdaterHook.get_warmup_lr and PolyLrUpdaterHook.get_lr)."""
import numpy as np
import paddle
import pytest

from beit_seg import build_beit_upernet
from config import ConfigError
from seg_optim import PolyWarmupLR, build_seg_lr_scheduler, seg_param_groups, seg_param_settings
from seg_reference import TINY, seg_config


def unilm_layer_id(var_name: str, num_max_layer: int) -> int:
    """unilm's get_num_layer_for_vit, restated."""
    if var_name in ('backbone.cls_token', 'backbone.mask_token', 'backbone.pos_embed'):
        return 0
    if var_name.startswith('backbone.patch_embed'):
        return 0
    if var_name.startswith('backbone.blocks'):
        return int(var_name.split('.')[2]) + 1
    return num_max_layer - 1


def unilm_groups(named_shapes: dict, num_layers_cfg: int, layer_decay_rate: float, weight_decay: float) -> dict:
    """{name: (group name, lr scale, weight decay)} as unilm's add_params assigns them."""
    num_layers = num_layers_cfg + 2
    assigned = {}
    for name, shape in named_shapes.items():
        if len(shape) == 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token'):
            group, this_weight_decay = 'no_decay', 0.0
        else:
            group, this_weight_decay = 'decay', weight_decay
        layer_id = unilm_layer_id(name, num_layers)
        assigned[name] = (f'layer_{layer_id}_{group}', layer_decay_rate ** (num_layers - layer_id - 1),
                          this_weight_decay)
    return assigned


def _trainable_shapes(model) -> dict:
    return {name: list(p.shape) for name, p in model.named_parameters() if not p.stop_gradient}


@pytest.mark.parametrize('size,depth,layer_decay', [
    ('base', 12, 0.9),
    pytest.param('large', 24, 0.95, marks=pytest.mark.slow),
])
def test_groups_follow_unilms_constructor(size, depth, layer_decay):
    width, heads = (768, 12) if size == 'base' else (1024, 16)
    blocks = [3, 5, 7, 11] if size == 'base' else [7, 11, 15, 23]
    config = seg_config(32, {'MODEL.EMBED_DIM': width, 'MODEL.DEPTH': depth, 'MODEL.NUM_HEADS': heads,
                             'SEG.OUT_INDICES': blocks, 'SEG.CHANNELS': width, 'MODEL.USE_ABS_POS_EMB': True})
    model = build_beit_upernet(config)
    settings = seg_param_settings(model, weight_decay=0.05, layer_decay=layer_decay)
    expected = unilm_groups(_trainable_shapes(model), depth, layer_decay, 0.05)
    assert set(settings) == set(expected)
    for name, (group, scale, weight_decay) in expected.items():
        assert settings[name]['layer_id'] == int(group.split('_')[1]), name
        assert settings[name]['lr_scale'] == pytest.approx(scale, rel=1e-12), name
        assert settings[name]['weight_decay'] == weight_decay, name
    # the rule's consequences, spelled out: unilm's segmentation decays cls_token, pos_embed and bias tables
    assert settings['backbone.cls_token']['weight_decay'] == 0.05
    assert settings['backbone.pos_embed']['weight_decay'] == 0.05
    assert settings['backbone.blocks.0.attn.relative_position_bias_table']['weight_decay'] == 0.05
    assert settings['backbone.blocks.0.gamma_1']['weight_decay'] == 0.0
    assert settings['backbone.patch_embed.proj.weight']['lr_scale'] == pytest.approx(layer_decay ** (depth + 1))
    assert settings['backbone.fpn1.0.weight']['layer_id'] == depth + 1
    assert settings['decode_head.conv_seg.weight']['lr_scale'] == 1.0
    assert settings[f'backbone.blocks.{depth - 1}.mlp.fc1.weight']['lr_scale'] == pytest.approx(layer_decay)

    groups = seg_param_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group['params']]
    assert sorted(grouped) == sorted(expected)  # each trainable parameter once, no BatchNorm statistics
    for group in groups:
        members = {expected[names[id(p)]] for p in group['params']}
        assert len(members) == 1  # one unilm group per Paddle group
        (_, scale, weight_decay), = members
        assert group['learning_rate'] == pytest.approx(scale) and group['weight_decay'] == weight_decay


def test_adamw_applies_each_groups_lr_scale_and_weight_decay():
    """One AdamW step with zero gradients moves a parameter only by its decoupled decay: lr * scale * wd * p."""
    model = build_beit_upernet(seg_config(32, TINY))
    groups = seg_param_groups(model, weight_decay=0.05, layer_decay=0.9)
    optimizer = paddle.optimizer.AdamW(learning_rate=0.1, parameters=groups, weight_decay=0.05)
    params = dict(model.named_parameters())
    chosen = ['backbone.patch_embed.proj.weight', 'backbone.blocks.2.attn.qkv.weight', 'decode_head.conv_seg.weight',
              'backbone.blocks.2.attn.proj.bias', 'backbone.cls_token']
    before = {name: params[name].numpy().copy() for name in chosen}
    for group in groups:
        for p in group['params']:
            p.grad = paddle.zeros_like(p)
    optimizer.step()
    settings = seg_param_settings(model, weight_decay=0.05, layer_decay=0.9)
    for name in chosen:
        factor = 1.0 - 0.1 * settings[name]['lr_scale'] * settings[name]['weight_decay']
        np.testing.assert_allclose(params[name].numpy(), before[name] * factor, rtol=1e-6, err_msg=name)
    assert settings['backbone.blocks.2.attn.proj.bias']['weight_decay'] == 0.0


def mmcv_poly_warmup(cur_iter: int, *, base_lr, max_iters, warmup_iters, warmup_ratio, power, min_lr=0.0):
    """mmcv's before_train_iter for policy 'poly', warmup 'linear', by_epoch False, restated."""
    regular_lr = (base_lr - min_lr) * (1 - cur_iter / max_iters) ** power + min_lr
    if cur_iter >= warmup_iters:
        return regular_lr
    k = (1 - cur_iter / warmup_iters) * (1 - warmup_ratio)
    return regular_lr * (1 - k)


ITERATIONS = [0, 1, 2, 749, 1498, 1499, 1500, 1501, 80000, 159998, 159999]


@pytest.mark.parametrize('base_lr,warmup_iters,power', [(3e-5, 1500, 1.0), (2e-5, 3000, 1.0), (1e-3, 1500, 0.9)])
def test_schedule_equals_mmcv_per_iteration(base_lr, warmup_iters, power):
    kwargs = dict(base_lr=base_lr, max_iters=160000, warmup_iters=warmup_iters, warmup_ratio=1e-6, power=power)
    scheduler = PolyWarmupLR(base_lr, max_iters=160000, warmup_iters=warmup_iters, warmup_ratio=1e-6, power=power)
    iteration = 0
    for target in ITERATIONS:
        while iteration < target:
            scheduler.step()
            iteration += 1
        assert scheduler.last_epoch == target
        assert scheduler() == pytest.approx(mmcv_poly_warmup(target, **kwargs), rel=1e-12, abs=1e-20), target
    assert scheduler.last_lr == pytest.approx(mmcv_poly_warmup(ITERATIONS[-1], **kwargs), rel=1e-12)


def test_schedule_edges():
    scheduler = PolyWarmupLR(3e-5, max_iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0)
    assert scheduler() == pytest.approx(3e-5 * 1e-6)  # the first iteration: warmup_ratio of the poly LR
    resumed = PolyWarmupLR(3e-5, max_iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, last_step=9)
    assert resumed.last_epoch == 10 and resumed() == pytest.approx(3e-5 * 0.9)  # warm-up over: the poly LR
    done = PolyWarmupLR(3e-5, max_iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, last_step=120)
    assert done() == 0.0
    no_warmup = PolyWarmupLR(3e-5, max_iters=100, warmup_iters=0, warmup_ratio=1e-6, power=1.0)
    assert no_warmup() == pytest.approx(3e-5)


def test_schedule_resumes_from_its_state_dict():
    scheduler = PolyWarmupLR(3e-5, max_iters=1000, warmup_iters=100, warmup_ratio=1e-6, power=1.0)
    for _ in range(137):
        scheduler.step()
    resumed = PolyWarmupLR(3e-5, max_iters=1000, warmup_iters=100, warmup_ratio=1e-6, power=1.0)
    resumed.set_state_dict(scheduler.state_dict())
    assert resumed.last_epoch == 137 and resumed() == scheduler()


def test_build_reads_the_seg_keys():
    config = seg_config(32, TINY, SEG__WARMUP_ITERS=20)
    scheduler = build_seg_lr_scheduler(config, 3e-5, max_iters=200, last_step=49)
    assert scheduler() == pytest.approx(mmcv_poly_warmup(50, base_lr=3e-5, max_iters=200, warmup_iters=20,
                                                         warmup_ratio=1e-6, power=1.0))


@pytest.mark.parametrize('key,value', [('SEG.WARMUP_ITERS', 201), ('SEG.WARMUP_ITERS', -1), ('SEG.WARMUP_RATIO', 0.0),
                                       ('SEG.POWER', 0.0)])
def test_build_refuses_bad_schedule_keys(key, value):
    config = seg_config(32, TINY, **{'SEG__WARMUP_ITERS': 20, key.replace('.', '__'): value})
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        build_seg_lr_scheduler(config, 3e-5, max_iters=200)
