"""optim.py against rules and updates written out independently here: unilm's layer decay and weight-decay
exclusion for every parameter of beit_base_patch16_224, AdamW + global-norm clipping against a numpy AdamW,
and the LR schedule against its closed form."""
import math

import numpy as np
import paddle
import pytest

from beit import build_beit
from config import get_config
from helpers import tiny_config
from optim import build_lr_scheduler, build_optimizer, param_settings, scaled_learning_rates


def unilm_layer_id(name: str, depth: int) -> int:
    """unilm's get_layer_id_for_vit, restated: embeddings 0, block i -> i + 1, the rest num_layers - 1."""
    if name in ('cls_token', 'mask_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('rel_pos_bias'):
        return depth + 1
    if name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def unilm_expectation(name: str, shape, depth: int, layer_decay: float, weight_decay: float) -> tuple[float, float]:
    num_layers = depth + 2
    lr_scale = layer_decay ** (num_layers - 1 - unilm_layer_id(name, depth))
    no_decay = len(shape) == 1 or name.endswith('.bias') or name in ('pos_embed', 'cls_token')
    return lr_scale, 0.0 if no_decay else weight_decay


def test_every_base_parameter_follows_the_unilm_rule():
    config = get_config('configs/beit_base_patch16_224.yaml')
    config.TRAIN.WEIGHT_DECAY = 0.05
    model = build_beit(config)
    scheduler = build_lr_scheduler(config, steps_per_epoch=10, world_size=1)
    optimizer, settings = build_optimizer(config, model, scheduler)
    params = dict(model.named_parameters())
    assert sorted(settings) == sorted(params)
    assert sum(int(np.prod(p.shape)) for p in params.values()) == 86_530_984
    decayed_names = set()
    for name, param in params.items():
        lr_scale, weight_decay = unilm_expectation(name, param.shape, 12, config.TRAIN.LAYER_DECAY, 0.05)
        assert settings[name]['lr_scale'] == pytest.approx(lr_scale, rel=1e-12), name
        assert settings[name]['weight_decay'] == weight_decay, name
        assert param.optimize_attr['learning_rate'] == pytest.approx(lr_scale, rel=1e-12), name
        assert optimizer._apply_decay_param_fun(param.name) == (weight_decay > 0), name
        if weight_decay:
            decayed_names.add(name)
    # spot checks of the rule itself: the head trains at full LR, the patch embedding at decay^13
    assert settings['head.weight']['lr_scale'] == 1.0
    assert settings['patch_embed.proj.weight']['lr_scale'] == pytest.approx(0.85 ** 13)
    assert settings['blocks.11.mlp.fc1.weight']['lr_scale'] == pytest.approx(0.85)
    assert 'blocks.0.attn.relative_position_bias_table' in decayed_names
    assert not decayed_names & {'cls_token', 'blocks.0.gamma_1', 'blocks.0.attn.q_bias', 'fc_norm.weight'}


def test_settings_table_matches_with_absolute_position_embedding():
    config = tiny_config()
    config.MODEL.USE_ABS_POS_EMB = True
    model = build_beit(config)
    settings = param_settings(model, 0.05, 0.75)
    assert settings['pos_embed'] == {'lr_scale': pytest.approx(0.75 ** 5), 'weight_decay': 0.0}


def numpy_adamw_step(params, grads, states, lrs, decays, step, beta1, beta2, eps, clip):
    """torch.optim.AdamW's update with global-norm clipping over all gradients, in float64."""
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    factor = clip / max(norm, clip) if clip > 0 else 1.0
    updated = []
    for value, grad, state, lr, decay in zip(params, grads, states, lrs, decays):
        grad = grad * factor
        value = value * (1 - lr * decay)
        state['m'] = beta1 * state['m'] + (1 - beta1) * grad
        state['v'] = beta2 * state['v'] + (1 - beta2) * grad ** 2
        m_hat = state['m'] / (1 - beta1 ** step)
        v_hat = state['v'] / (1 - beta2 ** step)
        updated.append(value - lr * m_hat / (np.sqrt(v_hat) + eps))
    return updated


@pytest.mark.parametrize('grad_clip', [0.0, 0.05])
def test_adamw_applies_lr_scale_decay_and_global_clipping_per_parameter(grad_clip):
    paddle.seed(1)
    config = tiny_config(GRAD_CLIP=grad_clip, WARMUP_EPOCHS=0, NUM_EPOCHS=1, BASE_LR=1e-2, END_LR=1e-3,
                         WEIGHT_DECAY=0.3)
    model = build_beit(config)
    model.eval()  # no drop path: the gradients are a function of the weights
    scheduler = build_lr_scheduler(config, steps_per_epoch=3, world_size=1)
    optimizer, settings = build_optimizer(config, model, scheduler)
    names = list(settings)
    params = dict(model.named_parameters())
    reference = [params[name].numpy().astype(np.float64) for name in names]
    states = [{'m': np.zeros_like(v), 'v': np.zeros_like(v)} for v in reference]
    images = paddle.randn([4, 3, 32, 32])
    labels = paddle.to_tensor([0, 3, 5, 9])
    beta1, beta2 = config.TRAIN.OPTIMIZER.BETAS
    for step in range(1, 4):
        lr = optimizer.get_lr()
        loss = paddle.nn.functional.cross_entropy(model(images), labels) * 50
        loss.backward()
        grads = [params[name].grad.numpy().astype(np.float64) for name in names]
        optimizer.step()
        optimizer.clear_grad()
        scheduler.step()
        reference = numpy_adamw_step(reference, grads, states, [lr * settings[n]['lr_scale'] for n in names],
                                     [settings[n]['weight_decay'] for n in names], step, beta1, beta2,
                                     config.TRAIN.OPTIMIZER.EPS, grad_clip)
        for name, expected in zip(names, reference):
            np.testing.assert_allclose(params[name].numpy(), expected, rtol=0, atol=2e-6, err_msg=name)


def closed_form_lr(step, peak, start, end, warmup, total):
    if step < warmup:
        return start + (peak - start) * step / warmup
    return end + (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_schedule_matches_closed_form_and_resumes_from_its_state():
    config = tiny_config(BASE_LR=1e-3, WARMUP_START_LR=1e-5, END_LR=2e-5, WARMUP_EPOCHS=2, NUM_EPOCHS=5)
    scheduler = build_lr_scheduler(config, steps_per_epoch=7, world_size=1)
    seen = []
    for _ in range(35):
        seen.append(scheduler.get_lr())
        scheduler.step()
    expected = [closed_form_lr(s, 1e-3, 1e-5, 2e-5, 14, 35) for s in range(35)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[0] == pytest.approx(1e-5) and seen[14] == pytest.approx(1e-3)
    resumed = build_lr_scheduler(config, steps_per_epoch=7, world_size=1)
    first = build_lr_scheduler(config, steps_per_epoch=7, world_size=1)
    for _ in range(20):
        first.step()
    resumed.set_state_dict(first.state_dict())
    assert resumed.get_lr() == pytest.approx(expected[20], rel=1e-12)


def test_last_epoch_positions_the_schedule():
    config = tiny_config(BASE_LR=1e-3, WARMUP_START_LR=0.0, END_LR=0.0, WARMUP_EPOCHS=1, NUM_EPOCHS=4,
                         LAST_EPOCH=2)
    scheduler = build_lr_scheduler(config, steps_per_epoch=10, world_size=1)
    assert scheduler.get_lr() == pytest.approx(closed_form_lr(20, 1e-3, 0.0, 0.0, 10, 40))


def test_linear_scaling_uses_the_total_batch():
    config = tiny_config(BASE_LR=4e-3, WARMUP_START_LR=1e-6, END_LR=1e-5, LINEAR_SCALED_LR=1024, ACCUM_ITER=2)
    config.DATA.BATCH_SIZE = 64
    assert scaled_learning_rates(config, world_size=4) == pytest.approx((2e-3, 5e-7, 5e-6))
    config.TRAIN.LINEAR_SCALED_LR = 0
    assert scaled_learning_rates(config, world_size=4) == pytest.approx((4e-3, 1e-6, 1e-5))
