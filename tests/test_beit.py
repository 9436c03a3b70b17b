"""The Paddle model itself: structure, initialisation, fast paths, block features and the layer-decay rule."""
import inspect
import itertools
import math

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
import pytest
import torch
from paddle.jit.dy2static.program_translator import StaticFunction
from timm.layers.pos_embed_rel import gen_relative_position_index
from timm.models._features import feature_take_indices

import beit
import cpu_ops
from beit import build_beit, layer_id_for_lr_decay, lr_scale_for_param, relative_position_index, resolve_block_indices
from beit_pretrain import BeitForMaskedImageModeling
from config import get_config
from helpers import ROOT
from inference import BlockFeatures
from load_pytorch_weights import convert_state_dict
from timm_reference import TINY, config_for, logits_difference, random_batch, timm_model


@pytest.mark.slow  # full-size models built: ~16 s on 2 cores
@pytest.mark.parametrize('cfg_name, expected', [
    ('beit_base_patch16_224', 86_530_984),
    ('beit_base_patch16_384', 86_744_104),
    ('beit_large_patch16_224', 304_430_568),
])
def test_parameter_counts_are_official(cfg_name, expected):
    model = build_beit(get_config(str(ROOT / 'configs' / f'{cfg_name}.yaml')))
    assert sum(p.numel().item() for p in model.parameters()) == expected


def test_state_dict_names_are_timms():
    spec = {**TINY, 'USE_ABS_POS_EMB': True, 'USE_SHARED_REL_POS_BIAS': True}
    ours = build_beit(config_for(spec)).state_dict()
    theirs = {name for name in timm_model(spec).state_dict() if not name.endswith('relative_position_index')}
    assert set(ours) == theirs


def test_relative_position_index_is_a_constant_buffer():
    model = build_beit(config_for(TINY))
    names = {name for name, _ in model.named_parameters()} | set(model.state_dict())
    assert not any('relative_position_index' in name for name in names)
    buffer = model.blocks[0].attn.relative_position_index
    assert buffer.stop_gradient and buffer.dtype == paddle.int64
    grid = (TINY['IMAGE_SIZE'] // TINY['PATCH_SIZE'],) * 2
    np.testing.assert_array_equal(relative_position_index(grid), gen_relative_position_index(grid, class_token=True))
    np.testing.assert_array_equal(relative_position_index((14, 14)),
                                  gen_relative_position_index((14, 14), class_token=True))


def test_initialisation_follows_unilm():
    model = build_beit(config_for({**TINY, 'EMBED_DIM': 96, 'NUM_HEADS': 3, 'DEPTH': 3, 'NUM_CLASSES': 200},
                                  INIT_SCALE=0.001))
    state = {name: value.numpy() for name, value in model.state_dict().items()}
    assert np.all(state['blocks.0.attn.relative_position_bias_table'] == 0)
    assert np.all(state['blocks.0.attn.q_bias'] == 0) and np.all(state['blocks.0.attn.v_bias'] == 0)
    np.testing.assert_allclose(state['blocks.2.gamma_1'], 0.1)
    assert np.all(state['head.bias'] == 0)
    assert state['head.weight'].std() == pytest.approx(0.02 * 0.001, rel=0.1)
    assert state['blocks.0.attn.qkv.weight'].std() == pytest.approx(0.02, rel=0.1)
    for layer_id in (1, 3):  # residual outputs shrink with depth
        expected = 0.02 / math.sqrt(2 * layer_id)
        assert state[f'blocks.{layer_id - 1}.mlp.fc2.weight'].std() == pytest.approx(expected, rel=0.1)


MODEL_KEYS_NOT_ARCHITECTURE = {'NAME', 'RESUME', 'PRETRAINED', 'PRETRAINED_EMA', 'REL_POS_INTERP'}
# key -> (a non-default value, what that value must change in the built model)
MODEL_KEY_EFFECTS = {
    'NUM_CLASSES': (5, lambda m: m.head.weight.shape == [32, 5]),
    'PATCH_SIZE': (4, lambda m: m.patch_embed.proj.weight.shape[-1] == 4),
    'EMBED_DIM': (64, lambda m: m.cls_token.shape[-1] == 64),
    'DEPTH': (3, lambda m: len(m.blocks) == 3),
    'NUM_HEADS': (4, lambda m: m.blocks[0].attn.num_heads == 4),
    'MLP_RATIO': (2.0, lambda m: m.blocks[0].mlp.fc1.weight.shape == [32, 64]),
    'QKV_BIAS': (False, lambda m: m.blocks[0].attn.q_bias is None),
    'DROPOUT': (0.3, lambda m: m.blocks[0].mlp.drop.p == m.blocks[0].attn.proj_drop.p == m.pos_drop.p == 0.3
                and m.blocks[0].attn.attn_drop_rate == 0.0),
    'ATTENTION_DROPOUT': (0.2, lambda m: m.blocks[0].attn.attn_drop_rate == 0.2
                          and m.blocks[0].attn.proj_drop.p == m.blocks[0].mlp.drop.p == 0.0),
    'DROPPATH': (0.3, lambda m: m.blocks[-1].drop_path.drop_prob == pytest.approx(0.3)),
    'INIT_VALUES': (None, lambda m: m.blocks[0].gamma_1 is None),
    'USE_ABS_POS_EMB': (True, lambda m: m.pos_embed is not None),
    'USE_REL_POS_BIAS': (False, lambda m: m.blocks[0].attn.relative_position_bias_table is None),
    'USE_SHARED_REL_POS_BIAS': (True, lambda m: m.rel_pos_bias is not None),
    'USE_MEAN_POOLING': (False, lambda m: m.fc_norm is None),
    'INIT_SCALE': (1.0, lambda m: m.head.weight.numpy().std() > 0.01),
    'FUSED_ATTN': (True, lambda m: m.blocks[0].attn.fused),
    'RECOMPUTE': (True, lambda m: m.recompute),
    'TO_STATIC': (True, lambda m: isinstance(m.forward, StaticFunction)),
}


@pytest.mark.parametrize('layer, leading', [
    (beit.Attention, (32, 2)), (beit.Block, (32, 2)), (beit.Mlp, (32, 64)), (beit.PatchEmbed, ()),
    (beit.BeitEncoder, ()), (beit.Beit, ()), (BeitForMaskedImageModeling, ()),
])
def test_model_constructors_take_their_options_by_keyword(layer, leading):
    """After the obvious leading sizes every option is keyword-only, so two rates or sizes cannot be swapped by
    position; the dropout rates have one name (and order) in every constructor."""
    parameters = list(inspect.signature(layer.__init__).parameters.values())[1:]
    positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert len(positional) == len(leading)
    with pytest.raises(TypeError):
        layer(*leading, *[0.1] * (len(parameters) - len(leading)))
    rates = [p.name for p in parameters if p.name.endswith('drop_rate') or p.name == 'drop_path_rate']
    expected = [name for name in ('drop_rate', 'attn_drop_rate', 'drop_path_rate') if name in rates]
    assert rates == expected


def test_every_model_key_reaches_the_model():
    assert set(config_for(TINY).MODEL) == set(MODEL_KEY_EFFECTS) | MODEL_KEYS_NOT_ARCHITECTURE
    baseline = build_beit(config_for(TINY))
    for key, (value, effect) in MODEL_KEY_EFFECTS.items():
        assert not effect(baseline), f'{key}: the test value must differ from the default'
        assert effect(build_beit(config_for({**TINY, key: value}))), f'MODEL.{key} was ignored by build_beit'


def load_timm_weights(model, reference):
    """``reference``'s weights, converted, into ``model``; returns ``model``."""
    fitted, _ = convert_state_dict({name: value.numpy() for name, value in reference.state_dict().items()}, model)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in fitted.items()})
    return model


@pytest.mark.parametrize('init_values', [0.0, None])
def test_layer_scale_is_off_at_zero_and_null_as_in_timm(init_values):
    """unilm's --layer_scale_init_value 0 and timm's init_values=0 build no gammas: neither do we."""
    spec = {**TINY, 'INIT_VALUES': init_values}
    reference = timm_model({**TINY, 'INIT_VALUES': 0.0})
    model = build_beit(config_for(spec))
    assert all(block.gamma_1 is None and block.gamma_2 is None for block in model.blocks)
    theirs = {name for name in reference.state_dict() if not name.endswith('relative_position_index')}
    assert set(model.state_dict()) == theirs
    load_timm_weights(model, reference)
    assert logits_difference(reference, model, random_batch(2, 32)) <= 1e-4


def test_dropout_and_drop_path_act_in_training_only():
    model = build_beit(config_for({**TINY, 'DROPOUT': 0.5, 'ATTENTION_DROPOUT': 0.5, 'DROPPATH': 0.5}))
    x = paddle.to_tensor(random_batch(4, 32))
    model.train()
    assert not np.allclose(model(x).numpy(), model(x).numpy())
    model.eval()
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_drop_path_keeps_the_exact_rate_and_scale_in_half_precision(dtype, monkeypatch):
    """Under AMP O2 the branch is half precision: the keep mask is drawn with probability 0.9 in float32 (bfloat16
    rounds it to 0.8984) and kept samples are x / 0.9 computed in float32, rounded once. Paddle's CPU bernoulli
    has no half-precision kernel: the stand-in draws in float32 and records the probabilities it was given."""
    given = []

    def recording_bernoulli(probabilities):
        given.append(probabilities)
        return paddle.to_tensor(np.random.default_rng(0).random(probabilities.shape) < probabilities.numpy()
                                ).astype(probabilities.dtype)

    monkeypatch.setattr(paddle, 'bernoulli', recording_bernoulli)
    samples = 40000
    x = paddle.to_tensor(np.random.default_rng(1).uniform(0.5, 2.0, (samples, 3, 2)).astype('float32')).astype(dtype)
    drop = beit.DropPath(0.1)
    out = drop.train()(x).astype('float32').numpy()
    assert len(given) == 1 and given[0].dtype == paddle.float32
    np.testing.assert_array_equal(given[0].numpy(), np.float32(0.9))
    kept = out[:, 0, 0] != 0
    assert abs(kept.mean() - 0.9) < 4 * math.sqrt(0.9 * 0.1 / samples)
    assert not out[~kept].any()
    exact = paddle.to_tensor(x.astype('float32').numpy() * (np.float32(1.0) / np.float32(0.9))).astype(dtype)
    np.testing.assert_array_equal(out[kept], exact.astype('float32').numpy()[kept])
    assert drop.eval()(x) is x


def test_drop_path_equals_timms_with_the_same_keep_mask(monkeypatch):
    """Given the same keep mask (stand-ins for both libraries' Bernoulli draws), DropPath's values are timm's
    drop_path's: dropped samples zero, kept ones scaled by 1/keep_prob."""
    from timm.layers import drop_path
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 2.0, (16, 5, 3)).astype('float32')
    mask = np.zeros((16, 1, 1), dtype='float32')
    mask[::3] = 1.0
    monkeypatch.setattr(paddle, 'bernoulli', lambda probabilities: paddle.to_tensor(mask))
    monkeypatch.setattr(torch.Tensor, 'bernoulli_', lambda tensor, p: tensor.copy_(torch.from_numpy(mask)))
    ours = beit.DropPath(0.3).train()(paddle.to_tensor(x)).numpy()
    theirs = drop_path(torch.from_numpy(x), 0.3, training=True).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
    assert ours[::3].all() and not ours[1::3].any()


def test_drop_path_keeps_the_mean_of_its_input():
    """With Paddle's own draws, the batch mean of DropPath(0.3)'s output is its input's, as for timm's drop_path:
    the residual branch is unbiased in training (within 4 standard errors of 40000 samples)."""
    from timm.layers import drop_path
    samples, keep = 40000, 0.7
    paddle.seed(0)
    torch.manual_seed(0)
    ones = np.ones((samples, 2, 3), dtype='float32')
    tolerance = 4 * math.sqrt((1 - keep) / keep / samples)
    ours = beit.DropPath(1 - keep).train()(paddle.to_tensor(ones)).numpy()
    theirs = drop_path(torch.from_numpy(ones), 1 - keep, training=True).numpy()
    assert abs(ours.mean() - 1.0) < tolerance and abs(theirs.mean() - 1.0) < tolerance


def _trained_copy_pair(spec, cpu_kernels: bool = False, **extra):
    """Two models with identical random weights, the second built with ``extra`` options (and cpu_ops' kernels
    with ``cpu_kernels``)."""
    first = build_beit(config_for(spec))
    second = build_beit(config_for(spec, **extra))
    if cpu_kernels:
        cpu_ops.use_cpu_kernels(second)
    state = {name: paddle.randn(value.shape) * 0.1 for name, value in first.state_dict().items()}
    first.set_state_dict(state)
    second.set_state_dict(state)
    return first, second


def _loss_and_grads(model, images):
    model.clear_gradients()
    loss = model(paddle.to_tensor(images)).square().mean()
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def flash_contract_sdpa(calls: list):
    """A stand-in for F.scaled_dot_product_attention that holds its caller to the contract of Paddle 3.x's flash
    kernel, which sdpa selects under AMP on Ampere or newer GPUs (paddle/nn/functional/sdpa.py): a 2-D or 3-D mask
    is expanded but a 4-D one reaches the kernel as it is, which requires one mask row per sample and q's dtype;
    the backward gives the mask no gradient. Records the batch size of every call in ``calls``."""
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, training=True):
        calls.append(query.shape[0])
        if attn_mask is not None:
            if attn_mask.ndim == 4 and attn_mask.shape[0] != query.shape[0]:
                raise ValueError(f'flash_attn: mask_dims[0] {attn_mask.shape[0]} != batch_size {query.shape[0]}')
            if attn_mask.dtype != query.dtype:
                raise TypeError(f'flash_attn: mask dtype {attn_mask.dtype} != query dtype {query.dtype}')
            attn_mask = attn_mask.detach()
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in (query, key, value))
        logits = paddle.matmul(q, k, transpose_y=True) * query.shape[-1] ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask
        weights = F.dropout(F.softmax(logits, axis=-1), dropout_p, training=training)
        return paddle.matmul(weights, v).transpose([0, 2, 1, 3])
    return sdpa


def _fused_kernel_on_cpu(monkeypatch, calls: list | None = None):
    """The model as on a GPU, where FUSED_ATTN may use sdpa, with the flash kernel's contract enforced."""
    monkeypatch.setattr(beit, 'on_accelerator', lambda x: True)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', flash_contract_sdpa([] if calls is None else calls))


FAST_PATHS = {  # name -> (options of the fast model, what to patch for its run)
    'cpu_ops kernels': ({'cpu_kernels': True}, None),
    'fused attention': ({'FUSED_ATTN': True}, _fused_kernel_on_cpu),
    'recompute': ({'RECOMPUTE': True}, None),
    'to_static': ({'TO_STATIC': True}, None),
    'to_static with cpu_ops kernels': ({'TO_STATIC': True, 'cpu_kernels': True}, None),
}


@pytest.mark.parametrize('path', FAST_PATHS)
def test_fast_paths_compute_the_same_function(path, monkeypatch):
    """Loss and every gradient of a fast path equal those of the plain model (Paddle ops, explicit attention)."""
    spec = {**TINY, 'USE_SHARED_REL_POS_BIAS': True, 'USE_ABS_POS_EMB': True, 'DROPPATH': 0.0}
    extra, patch = FAST_PATHS[path]
    plain, fast = _trained_copy_pair(spec, **extra)
    images = random_batch(3, 32)
    plain.train()
    fast.train()
    loss_plain, grads_plain = _loss_and_grads(plain, images)
    with monkeypatch.context() as patched:
        if patch is not None:
            patch(patched)
        loss_fast, grads_fast = _loss_and_grads(fast, images)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-5)
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fast[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_fused_attention_runs_where_its_kernel_is_right(monkeypatch):
    """On a GPU, sdpa computes the model without a trained bias (training) and with a frozen one (evaluation);
    a bias table being trained stays on the explicit path, which gives it its gradient."""
    calls = []
    _fused_kernel_on_cpu(monkeypatch, calls)
    no_bias = {**TINY, 'USE_REL_POS_BIAS': False, 'USE_ABS_POS_EMB': True, 'DROPPATH': 0.0}
    plain, fused = _trained_copy_pair(no_bias, FUSED_ATTN=True)
    images = random_batch(3, 32)
    loss_plain, grads_plain = _loss_and_grads(plain.train(), images)
    loss_fused, grads_fused = _loss_and_grads(fused.train(), images)
    assert calls == [3] * TINY['DEPTH'] and loss_fused == pytest.approx(loss_plain, rel=1e-5)
    for name, grad in grads_plain.items():
        np.testing.assert_allclose(grads_fused[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)
    plain, fused = _trained_copy_pair({**TINY, 'USE_SHARED_REL_POS_BIAS': True}, FUSED_ATTN=True)
    calls.clear()
    with paddle.no_grad():
        expected = plain.eval()(paddle.to_tensor(images)).numpy()
        np.testing.assert_allclose(fused.eval()(paddle.to_tensor(images)).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert calls == [3] * TINY['DEPTH']


def _recompute_training_worker(output: str) -> None:
    dist.init_parallel_env()
    _train_two_steps(dist.get_rank(), dist.get_world_size(), recompute=True, output=output)


def _train_two_steps(rank: int, world_size: int, recompute: bool, output: str) -> None:
    """Two SGD steps on the same 4-image batches, split over ``world_size`` DataParallel processes."""
    paddle.seed(0)
    model = build_beit(config_for({**TINY, 'DROPPATH': 0.0}, RECOMPUTE=recompute)).train()
    optimizer = paddle.optimizer.SGD(0.5, parameters=model.parameters())
    network = paddle.DataParallel(model) if world_size > 1 else model
    rng = np.random.default_rng(1)
    share = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    for _ in range(2):
        images = rng.standard_normal((4, 3, 32, 32)).astype('float32')
        labels = rng.integers(0, TINY['NUM_CLASSES'], 4)
        loss = F.cross_entropy(network(paddle.to_tensor(images[share])), paddle.to_tensor(labels[share]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    if rank == 0:
        paddle.save(model.state_dict(), output)


@pytest.mark.slow
def test_recompute_with_two_processes_trains_as_one_process(tmp_path):
    """DataParallel's reducer and reentrant (PyLayer) recompute fail together ("has been ready before")."""
    _train_two_steps(0, 1, recompute=False, output=str(tmp_path / 'one.pdparams'))
    dist.spawn(_recompute_training_worker, args=(str(tmp_path / 'two.pdparams'),), nprocs=2)
    one, two = paddle.load(str(tmp_path / 'one.pdparams')), paddle.load(str(tmp_path / 'two.pdparams'))
    assert set(one) == set(two)
    for name, value in one.items():
        np.testing.assert_allclose(two[name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize('kernels', ['paddle', 'cpu_ops'])
def test_gradients_match_timm(kernels):
    """The backward pass, of Paddle's ops and of cpu_ops' kernels, gives timm's gradients for every parameter."""
    spec = {**TINY, 'USE_SHARED_REL_POS_BIAS': True, 'USE_ABS_POS_EMB': True}
    reference = timm_model(spec)  # built without dropout or drop path
    model = build_beit(config_for(spec, DROPPATH=0.0))
    if kernels == 'cpu_ops':
        cpu_ops.use_cpu_kernels(model)
    load_timm_weights(model, reference)
    images = random_batch(3, 32)
    reference.train()
    model.train()
    reference(torch.from_numpy(images)).square().mean().backward()
    _, grads = _loss_and_grads(model, images)
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    converted, _ = convert_state_dict(expected, model)
    assert set(converted) == set(grads)
    for name, grad in grads.items():
        scale = np.abs(converted[name]).max()
        np.testing.assert_allclose(grad, converted[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_plain_attention_path_matches_timm():
    reference = timm_model(TINY)
    model = load_timm_weights(build_beit(config_for(TINY, FUSED_ATTN=False)), reference)
    assert logits_difference(reference, model, random_batch(2, 32)) <= 1e-4


def test_export_with_dynamic_batch(tmp_path):
    model = build_beit(config_for(TINY)).eval()
    static = paddle.jit.to_static(model, input_spec=[paddle.static.InputSpec([None, 3, 32, 32], 'float32')],
                                  full_graph=True)
    for batch_size in (1, 3):
        images = paddle.to_tensor(random_batch(batch_size, 32))
        np.testing.assert_allclose(static(images).numpy(), model(images).numpy(), atol=1e-5)
    paddle.jit.save(static, str(tmp_path / 'beit'))
    loaded = paddle.jit.load(str(tmp_path / 'beit'))
    images = paddle.to_tensor(random_batch(5, 32))
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-5)


FEATURE_SPEC = {**TINY, 'DEPTH': 4}
# None: every block; 2: the last two; a list in any order, negative from the end, repeats once (-3 is block 1)
INDEX_CHOICES = [None, 2, [0, -1], [-1, 0], [-2], [-3, 1]]
# (norm, stop_early, intermediates_only): every pair of values of any two of them, in four runs instead of eight
SWITCH_PAIRS = [(False, False, False), (False, True, True), (True, False, True), (True, True, False)]


def test_block_indices_are_timms():
    for indices in [*INDEX_CHOICES, 1, 4, [3], [-4, 2]]:
        timm_indices, _ = feature_take_indices(4, indices)
        assert resolve_block_indices(4, indices) == sorted(set(timm_indices)), indices


def _flat_arrays(result) -> list[np.ndarray]:
    """forward_intermediates' result (a tensor, lists and (map, prefix) pairs nested) as a flat list of arrays."""
    if isinstance(result, list | tuple):
        return [array for item in result for array in _flat_arrays(item)]
    return [result.numpy()]


def _intermediates_difference(reference, model, images: np.ndarray, **options) -> float:
    """Max abs difference of every tensor both models' forward_intermediates return; shapes and counts must agree."""
    with torch.no_grad():
        theirs = _flat_arrays(reference.forward_intermediates(torch.from_numpy(images), **options))
    with paddle.no_grad():
        ours = _flat_arrays(model.forward_intermediates(paddle.to_tensor(images), **options))
    assert [a.shape for a in ours] == [a.shape for a in theirs], options
    return max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize('batch_size', [1, 3])
@pytest.mark.parametrize('kernels', ['paddle', 'cpu_ops'])
@pytest.mark.parametrize('mean_pooling', [True, False], ids=['mean-pooling', 'cls-token'])
def test_forward_intermediates_match_timm(mean_pooling, kernels, batch_size):
    """Every index choice, format, norm, early stop and result form gives timm's tensors (the final tokens too)."""
    spec = {**FEATURE_SPEC, 'USE_MEAN_POOLING': mean_pooling, 'USE_ABS_POS_EMB': True}
    reference = timm_model(spec)
    model = load_timm_weights(build_beit(config_for(spec)), reference).eval()
    if kernels == 'cpu_ops':
        cpu_ops.use_cpu_kernels(model)
    images = random_batch(batch_size, 32)
    for indices, output_fmt, (norm, stop_early, only) in itertools.product(
            INDEX_CHOICES, ['NCHW', 'NLC'], SWITCH_PAIRS):
        options = dict(indices=indices, output_fmt=output_fmt, norm=norm, stop_early=stop_early,
                       intermediates_only=only)
        assert _intermediates_difference(reference, model, images, **options) <= 1e-4, options
    options = dict(indices=[0, -1], return_prefix_tokens=True, norm=True)
    assert _intermediates_difference(reference, model, images, **options) <= 1e-4


def test_forward_intermediates_shapes_and_final_tokens():
    """NCHW maps are the NLC patch tokens on the grid; the final tokens are forward_tokens' unless stopped early."""
    model = build_beit(config_for({**FEATURE_SPEC, 'USE_MEAN_POOLING': False})).eval()
    images = paddle.to_tensor(random_batch(3, 32))
    final, maps = model.forward_intermediates(images, indices=[1, -1])
    tokens = model.forward_intermediates(images, indices=[1, -1], output_fmt='NLC', intermediates_only=True)
    assert [m.shape for m in maps] == [[3, 32, 4, 4]] * 2 and [t.shape for t in tokens] == [[3, 16, 32]] * 2
    for grid, patches in zip(maps, tokens):
        np.testing.assert_array_equal(grid.flatten(2).transpose([0, 2, 1]).numpy(), patches.numpy())
    np.testing.assert_array_equal(final.numpy(), model.forward_tokens(images).numpy())
    early, _ = model.forward_intermediates(images, indices=[1], stop_early=True)
    assert not np.allclose(early.numpy(), final.numpy())


@pytest.mark.parametrize('options, message', [
    ({'indices': 0}, 'the last 0 blocks; the model has 1 to 4'),
    ({'indices': 5}, 'the last 5 blocks; the model has 1 to 4'),
    ({'indices': [4]}, 'block index 4 is out of range for 4 blocks'),
    ({'indices': [0, -5]}, 'block index -5 is out of range for 4 blocks'),
    ({'indices': []}, 'indices is empty'),
    ({'output_fmt': 'NHWC'}, "output_fmt must be one of \\['NCHW', 'NLC'\\], got 'NHWC'"),
])
def test_forward_intermediates_refuse_bad_choices(options, message):
    model = build_beit(config_for(FEATURE_SPEC))
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(paddle.zeros([1, 3, 32, 32]), **options)


@pytest.mark.parametrize('kernels', ['paddle', 'cpu_ops'])
def test_block_features_export_with_dynamic_batch(tmp_path, kernels):
    """A forward_intermediates model traced for [None, 3, S, S] gives the dygraph maps for any batch, also saved."""
    model = build_beit(config_for(FEATURE_SPEC)).eval()
    if kernels == 'cpu_ops':
        cpu_ops.use_cpu_kernels(model)
    features = BlockFeatures(model, [1, -1]).eval()
    static = paddle.jit.to_static(features, input_spec=[paddle.static.InputSpec([None, 3, 32, 32], 'float32')],
                                  full_graph=True)
    paddle.jit.save(static, str(tmp_path / 'features'))
    loaded = paddle.jit.load(str(tmp_path / 'features'))
    for batch_size in (1, 3):
        images = paddle.to_tensor(random_batch(batch_size, 32, seed=batch_size))
        with paddle.no_grad():
            expected = [maps.numpy() for maps in features(images)]
        assert [maps.shape for maps in expected] == [(batch_size, 32, 4, 4)] * 2
        for traced in (static, loaded):
            for ours, theirs in zip(traced(images), expected, strict=True):
                np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)


def test_wrong_input_size_is_a_clear_error():
    model = build_beit(config_for(TINY))
    with pytest.raises(ValueError, match='built for 32x32'):
        model(paddle.zeros([1, 3, 48, 48]))


def test_layer_ids_follow_unilm_rule():
    depth = 12
    assert layer_id_for_lr_decay('cls_token', depth) == 0
    assert layer_id_for_lr_decay('pos_embed', depth) == 0
    assert layer_id_for_lr_decay('mask_token', depth) == 0
    assert layer_id_for_lr_decay('patch_embed.proj.weight', depth) == 0
    assert layer_id_for_lr_decay('blocks.0.norm1.weight', depth) == 1
    assert layer_id_for_lr_decay('blocks.11.attn.relative_position_bias_table', depth) == 12
    for name in ('rel_pos_bias.relative_position_bias_table', 'fc_norm.weight', 'norm.bias', 'head.weight'):
        assert layer_id_for_lr_decay(name, depth) == 13
    assert lr_scale_for_param('head.weight', depth, 0.65) == 1.0
    assert lr_scale_for_param('patch_embed.proj.weight', depth, 0.65) == pytest.approx(0.65 ** 13)
    assert lr_scale_for_param('blocks.3.mlp.fc1.bias', depth, 0.65) == pytest.approx(0.65 ** 9)
