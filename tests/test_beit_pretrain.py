"""The MIM pre-training models against independent computations: timm's BEiT blocks with the mask token
substituted in torch (v1) and a timm-built unilm CLS-branch model (v2, tests/beit2_reference.py), the
fine-tuning encoder, unilm's initialisation and names."""
import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF

from beit import adapt_state_dict, build_beit, encoder_kwargs
from beit2_reference import reference_model, summed_loss, unilm_state_dict
from beit_pretrain import BeitForMaskedImageModeling, BeitV2ForMaskedImageModeling, build_beit_pretrain
from checkpoint import load_pretrained
from load_pytorch_weights import compare_with_timm, convert_state_dict
from optim import param_settings
from timm_reference import PRETRAIN_SPEC as SPEC
from timm_reference import PRETRAIN_VOCAB as VOCAB
from timm_reference import TINY, config_for, pretraining_checkpoint, random_batch, save_checkpoint
from torch_checkpoint import linear_weight_names, read_checkpoint, to_paddle_layout

GRID = TINY['IMAGE_SIZE'] // TINY['PATCH_SIZE']  # 4x4 patches
UNILM_PRETRAIN_KEYS = {'cls_token', 'mask_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
                       'rel_pos_bias.relative_position_bias_table', 'norm.weight', 'norm.bias', 'lm_head.weight',
                       'lm_head.bias'}
UNILM_BLOCK_KEYS = {'gamma_1', 'gamma_2', 'norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias',
                    'attn.qkv.weight', 'attn.q_bias', 'attn.v_bias', 'attn.proj.weight', 'attn.proj.bias',
                    'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'}


def pretrain_config(spec=SPEC):
    config = config_for(spec)
    config.PRETRAIN.VOCAB_SIZE = VOCAB
    return config


def loaded_model(state):
    model = build_beit_pretrain(pretrain_config())
    fitted, _ = convert_state_dict({name: value.numpy() for name, value in state.items()}, model)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in fitted.items()})
    return model.eval()


def random_masks(batch, seed=0, count=6):
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, GRID * GRID), dtype=bool)
    for row in masks:
        row[rng.choice(GRID * GRID, count, replace=False)] = True
    return masks


def torch_mim_logits(reference, state, images, masks):
    """unilm's forward written with timm's layers: masked patch embeddings replaced by the mask token."""
    x = reference.patch_embed(images)
    weight = masks.unsqueeze(-1).float()
    x = x * (1 - weight) + state['mask_token'] * weight
    x = torch.cat([reference.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    shared_bias = reference.rel_pos_bias()
    for block in reference.blocks:
        x = block(x, shared_rel_pos_bias=shared_bias)
    x = reference.norm(x)[:, 1:]
    return TF.linear(x[masks], state['lm_head.weight'], state['lm_head.bias'])


def test_masked_patches_are_invisible_and_unmasked_ones_are_not():
    _, state = pretraining_checkpoint()
    model = loaded_model(state)
    images, masks = random_batch(2, TINY['IMAGE_SIZE']), random_masks(2)
    patch = TINY['PATCH_SIZE']

    def tokens(pixels):
        with paddle.no_grad():
            return model.forward_tokens(paddle.to_tensor(pixels), paddle.to_tensor(masks)).numpy()

    before = tokens(images)
    masked_index, visible_index = np.flatnonzero(masks[0])[0], np.flatnonzero(~masks[0])[0]
    for index, changes in ((masked_index, False), (visible_index, True)):
        row, col = divmod(index, GRID)
        edited = images.copy()
        edited[0, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 3.0
        after = tokens(edited)
        assert np.abs(after[0] - before[0]).max() > 1e-3 if changes else np.array_equal(after, before)
        np.testing.assert_array_equal(after[1], before[1])  # the other image is untouched either way


@pytest.mark.parametrize('per_block', [False, True])
def test_unmasked_encoder_equals_the_fine_tuning_encoder(per_block):
    """Same weights, nothing masked: the fine-tuning model (cls pooling keeps ``norm``) gives the same tokens,
    with the shared table kept or spread into every block."""
    _, state = pretraining_checkpoint()
    model = loaded_model(state)
    spec = {**SPEC, 'USE_REL_POS_BIAS': per_block, 'USE_SHARED_REL_POS_BIAS': not per_block}
    fine_tuning = build_beit(config_for(spec))
    fitted, notes = adapt_state_dict({name: value.numpy() for name, value in model.state_dict().items()},
                                     fine_tuning)
    fine_tuning.set_state_dict({**fine_tuning.state_dict(), **{k: paddle.to_tensor(v) for k, v in fitted.items()}})
    assert any('copied the shared relative position bias' in note for note in notes) == per_block
    images = paddle.to_tensor(random_batch(2, TINY['IMAGE_SIZE']))
    nothing = paddle.zeros([2, GRID * GRID], dtype='bool')
    with paddle.no_grad():
        ours = model.forward_tokens(images, nothing).numpy()
        np.testing.assert_allclose(ours, model.forward_tokens(images).numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(ours, fine_tuning.eval().forward_tokens(images).numpy(), rtol=0, atol=1e-6)


# unilm's pre-training trunc_normal_ (beit/, beit2/ modeling_pretrain.py): std 0.02 cut at +-1 std, whose spread is
# 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) (the truncated normal's variance), not 0.02 as fine-tuning's.
INIT_STD = 0.02
TRUNCATED_STD = INIT_STD * np.sqrt(1 - 2 * np.exp(-0.5) / np.sqrt(2 * np.pi) / 0.6826894921370859)


def assert_unilm_pretraining_init(value, name, scale=1.0):
    """Within +-0.02 / scale, spread as unilm's truncated normal (scaled down by ``scale``), mean near 0."""
    value = value.astype('float64')
    assert np.abs(value).max() <= INIT_STD / scale + 1e-9, name
    assert np.abs(value).max() > 0.95 * INIT_STD / scale, name  # the cut is reached: not a narrower normal
    assert value.std() == pytest.approx(TRUNCATED_STD / scale, rel=0.06), name
    assert abs(value.mean()) < 0.1 * TRUNCATED_STD / scale, name


def test_truncated_std_is_the_one_of_unilms_truncated_normal():
    draws = np.random.default_rng(0).normal(size=2_000_000)
    assert draws[np.abs(draws) <= 1].std() * INIT_STD == pytest.approx(TRUNCATED_STD, rel=2e-3)


def test_names_are_unilms_and_initialisation_follows_it():
    """unilm's pre-training init: cls token, mask token, absolute position embedding, every Linear weight (lm_head
    too) and the patch embedding's conv weight from a normal of std 0.02 cut at +-0.02; biases zero; the residual
    outputs of block i divided by sqrt(2i); LayerNorms 1 / 0, relative position tables 0."""
    paddle.seed(0)
    config = config_for({**TINY, 'EMBED_DIM': 256, 'DEPTH': 4, 'USE_REL_POS_BIAS': False,
                         'USE_SHARED_REL_POS_BIAS': True})
    config.PRETRAIN.VOCAB_SIZE = 8192
    model = build_beit_pretrain(config)
    block_keys = {f'blocks.{i}.{key}' for i in range(4) for key in UNILM_BLOCK_KEYS}
    assert set(model.state_dict()) == UNILM_PRETRAIN_KEYS | block_keys
    assert model.lm_head.weight.shape == [256, 8192]  # Paddle's [in, out]
    state = {name: value.numpy() for name, value in model.state_dict().items()}
    for name in ('lm_head.weight', 'mask_token', 'cls_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
                 'blocks.3.mlp.fc1.weight'):
        assert_unilm_pretraining_init(state[name], name)
    for layer_id in range(1, 5):
        for name in ('attn.proj.weight', 'mlp.fc2.weight'):
            assert_unilm_pretraining_init(state[f'blocks.{layer_id - 1}.{name}'], name, np.sqrt(2 * layer_id))
    for name, value in state.items():
        if name.endswith(('.bias', 'q_bias', 'v_bias', 'relative_position_bias_table')):
            np.testing.assert_array_equal(value, 0, err_msg=name)  # no head init scale in pre-training
        if 'norm' in name and name.endswith('.weight'):
            np.testing.assert_array_equal(value, 1, err_msg=name)
    for block in model.blocks:
        np.testing.assert_allclose(block.gamma_1.numpy(), 0.1)


def test_the_absolute_position_embedding_follows_unilms_pretraining_init():
    paddle.seed(1)
    config = config_for({**TINY, 'EMBED_DIM': 256, 'DEPTH': 1, 'USE_ABS_POS_EMB': True, 'USE_REL_POS_BIAS': False})
    config.PRETRAIN.VOCAB_SIZE = VOCAB
    assert_unilm_pretraining_init(build_beit_pretrain(config).pos_embed.numpy(), 'pos_embed')


def test_fine_tuning_keeps_its_own_init():
    """Only pre-training changed: the fine-tuning model's trunc-normal Linears still spread as std 0.02."""
    paddle.seed(0)
    model = build_beit(config_for({**TINY, 'EMBED_DIM': 256, 'DEPTH': 1}))
    value = model.blocks[0].attn.qkv.weight.numpy()
    assert value.std() == pytest.approx(INIT_STD, rel=0.05) and np.abs(value).max() > 2 * INIT_STD


def test_optimizer_rules_cover_the_pretraining_tensors():
    model = BeitForMaskedImageModeling(vocab_size=VOCAB, **{
        'img_size': 32, 'patch_size': 8, 'in_chans': 3, 'embed_dim': 32, 'depth': 2, 'num_heads': 2,
        'mlp_ratio': 4.0, 'qkv_bias': True, 'drop_rate': 0.0, 'attn_drop_rate': 0.0, 'drop_path_rate': 0.0,
        'init_values': 0.1, 'use_abs_pos_emb': False, 'use_rel_pos_bias': False, 'use_shared_rel_pos_bias': True,
        'fused_attn': True, 'recompute': False})
    settings = param_settings(model, weight_decay=0.05, layer_decay=0.5)
    # unilm: the mask token sits with the embeddings (layer 0) and, being 3-D and not in the no-decay set, decays
    assert settings['mask_token'] == {'lr_scale': 0.5 ** 3, 'weight_decay': 0.05}
    assert settings['cls_token'] == {'lr_scale': 0.5 ** 3, 'weight_decay': 0.0}
    assert settings['lm_head.weight'] == {'lr_scale': 1.0, 'weight_decay': 0.05}
    assert settings['lm_head.bias']['weight_decay'] == 0.0
    assert settings['rel_pos_bias.relative_position_bias_table']['lr_scale'] == 1.0


# BEiT v2: the CLS branch. A tiny width at the depths and early layers of B (12, 9) and L (24, 21) too.
V2_SPEC = {**SPEC, 'DEPTH': 4}


def v2_model(spec=V2_SPEC, **branch) -> BeitV2ForMaskedImageModeling:
    return BeitV2ForMaskedImageModeling(vocab_size=VOCAB, **branch, **encoder_kwargs(config_for(spec)))


def v2_pair(spec=V2_SPEC, **branch):
    """The torch reference with random weights and our model loading its unilm-named state dict through the
    converter's mapping (which must need no adaptation)."""
    reference = reference_model(spec, vocab_size=VOCAB, **branch)
    model = v2_model(spec, **branch)
    fitted, notes = convert_state_dict({name: value.numpy() for name, value in unilm_state_dict(reference).items()},
                                       model)
    assert notes == [] and fitted.keys() == model.state_dict().keys()
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in fitted.items()})
    return reference, model.eval()


def masks_and_positions(batch, seed=0):
    masks = random_masks(batch, seed)
    return masks, np.stack([np.flatnonzero(row) for row in masks]).astype(np.int64)


@pytest.mark.parametrize('depth, early_layers', [(4, 2), (4, 4), (12, 9), (24, 21)])
@pytest.mark.parametrize('shared_lm_head', [True, False])
def test_v2_logits_equal_the_reference(depth, early_layers, shared_lm_head):
    """Both branches' logits at the masked patches; early_layers = depth is unilm's upper bound."""
    branch = {'early_layers': early_layers, 'head_layers': 2, 'shared_lm_head': shared_lm_head}
    reference, model = v2_pair({**V2_SPEC, 'DEPTH': depth}, **branch)
    images, (masks, positions) = random_batch(2, TINY['IMAGE_SIZE']), masks_and_positions(2)
    with torch.no_grad():
        expected = [logits.numpy() for logits in reference(torch.from_numpy(images), torch.from_numpy(masks))]
    with paddle.no_grad():
        actual = model(paddle.to_tensor(images), paddle.to_tensor(masks), paddle.to_tensor(positions))
    assert len(actual) == 2
    for ours, theirs in zip(actual, expected):
        assert ours.shape == [masks.sum(), VOCAB]
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=0, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # the branches differ: neither stands in for the other


@pytest.mark.parametrize('shared_lm_head', [True, False])
def test_v2_gradients_of_the_summed_losses_equal_the_reference(shared_lm_head):
    """unilm's loss, the main branch's cross-entropy plus the CLS branch's: every parameter's gradient (in eval
    mode: the config's default drop path would make the two models' training forwards differ)."""
    reference, model = v2_pair(early_layers=2, head_layers=2, shared_lm_head=shared_lm_head)
    images, (masks, positions) = random_batch(2, TINY['IMAGE_SIZE']), masks_and_positions(2)
    targets = np.random.default_rng(1).integers(0, VOCAB, masks.sum())
    summed_loss(reference(torch.from_numpy(images), torch.from_numpy(masks)), torch.from_numpy(targets)).backward()
    expected = to_paddle_layout({name: param.grad.numpy() for name, param in reference.named_parameters()}, model)
    logits = model(paddle.to_tensor(images), paddle.to_tensor(masks), paddle.to_tensor(positions))
    sum(paddle.nn.functional.cross_entropy(branch, paddle.to_tensor(targets)) for branch in logits).backward()
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad.numpy(), expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(expected['cls_pt_layers.0.mlp.fc1.weight']).max() > 1e-3


@pytest.mark.parametrize('settings, named', [
    ({'early_layers': 0}, 'early_layers 0 is outside \\[1, 4\\]'),
    ({'early_layers': 5}, 'early_layers 5 is outside \\[1, 4\\]'),
    ({'early_layers': 2, 'head_layers': 0}, 'head_layers 0 is below 1'),
])
def test_v2_refuses_bad_settings_naming_them(settings, named):
    with pytest.raises(ValueError, match=named):
        v2_model(**settings)


def test_v2_names_and_initialisation_follow_unilm():
    """unilm's names (v1's + the branch); the branch's blocks are not unilm's trunc-normal ones: they were built
    after its init ran, so PyTorch's default Linear init, scaled down as blocks early_layers + 1 onwards."""
    paddle.seed(0)
    spec = {**V2_SPEC, 'EMBED_DIM': 256}
    model = BeitV2ForMaskedImageModeling(vocab_size=8192, early_layers=3, head_layers=2, shared_lm_head=False,
                                         **{**encoder_kwargs(config_for(spec)), 'drop_path_rate': 0.1})
    block_keys = {f'{stack}.{i}.{key}' for stack, count in (('blocks', 4), ('cls_pt_layers', 2))
                  for i in range(count) for key in UNILM_BLOCK_KEYS}
    branch_keys = {'cls_pt_norm.weight', 'cls_pt_norm.bias', 'cls_pt_lm_head.weight', 'cls_pt_lm_head.bias'}
    assert set(model.state_dict()) == UNILM_PRETRAIN_KEYS | block_keys | branch_keys
    for index, block in enumerate(model.cls_pt_layers):
        layer_id = 3 + index + 1
        for weight, fan_in, scale in ((block.attn.qkv.weight, 256, 1), (block.mlp.fc1.weight, 256, 1),
                                      (block.attn.proj.weight, 256, np.sqrt(2 * layer_id)),
                                      (block.mlp.fc2.weight, 1024, np.sqrt(2 * layer_id))):
            bound = 1 / np.sqrt(fan_in) / scale
            assert np.abs(weight.numpy()).max() <= bound and weight.numpy().std() == pytest.approx(
                bound / np.sqrt(3), rel=0.05)
        assert np.abs(block.mlp.fc1.bias.numpy()).max() <= 1 / 16 and block.mlp.fc1.bias.numpy().std() > 0.01
        np.testing.assert_array_equal(block.attn.q_bias.numpy(), 0)
        np.testing.assert_allclose(block.gamma_1.numpy(), 0.1)
        # unilm's drop-path decay over max(depth, early_layers + head_layers) = 5 blocks, from position 3
        assert block.drop_path.drop_prob == pytest.approx(np.linspace(0, 0.1, 5)[3 + index])
    assert_unilm_pretraining_init(model.cls_pt_lm_head.weight.numpy(), 'cls_pt_lm_head.weight')
    np.testing.assert_array_equal(model.cls_pt_lm_head.bias.numpy(), 0)
    np.testing.assert_array_equal(model.cls_pt_norm.weight.numpy(), 1)
    shared = set(v2_model(early_layers=2, head_layers=1).state_dict())
    assert not any(name.startswith(('cls_pt_norm', 'cls_pt_lm_head')) for name in shared)


@pytest.mark.parametrize('shared_lm_head', [True, False])
def test_a_v2_pretraining_checkpoint_starts_fine_tuning_without_the_cls_branch(tmp_path, shared_lm_head):
    """-pretrained from a v2 pre-training model's weights: the encoder loaded, the branch, mask token and lm
    head dropped and named in the notes."""
    pretrained = v2_model(early_layers=2, head_layers=2, shared_lm_head=shared_lm_head)
    table = pretrained.rel_pos_bias.relative_position_bias_table
    table.set_value(paddle.randn(table.shape))
    path = tmp_path / 'v2_pretrain.pdparams'
    paddle.save(pretrained.state_dict(), str(path))
    model = build_beit(config_for({**V2_SPEC, 'USE_REL_POS_BIAS': True, 'USE_SHARED_REL_POS_BIAS': False}))
    notes, _ = load_pretrained(model, str(path), use_ema=False, rel_pos_interp='cubic')
    own = ', cls_pt_norm (2), cls_pt_lm_head (2)' if not shared_lm_head else ''
    assert ('dropped the pre-training-only tensors (the model has no place for them): mask_token (1), lm_head (2), '
            f'cls_pt_layers (30){own}') in notes
    for block, trained in zip(model.blocks, pretrained.blocks):
        np.testing.assert_array_equal(block.attn.relative_position_bias_table.numpy(), table.numpy())
        np.testing.assert_array_equal(block.mlp.fc1.weight.numpy(), trained.mlp.fc1.weight.numpy())


@pytest.mark.parametrize('fmt', ['unilm.pth', 'deepspeed.pth'])
def test_a_unilm_v2_pretraining_file_converts_for_the_v2_model(tmp_path, fmt):
    """load_pytorch_weights' mapping and -check need nothing new for a v2 file once the config builds the v2
    model: the branch's Linears are the model's, so they are transposed; -check compares the main branch's tokens
    with timm's encoder, which ignores the branch's tensors."""
    reference = reference_model(V2_SPEC, vocab_size=VOCAB, early_layers=2, head_layers=2, shared_lm_head=False)
    state = unilm_state_dict(reference)
    assert 'rel_pos_bias.relative_position_index' in state
    save_checkpoint(state, tmp_path / 'pt1k.pth', fmt)
    model = v2_model(early_layers=2, head_layers=2, shared_lm_head=False)
    fitted, notes = convert_state_dict(read_checkpoint(str(tmp_path / 'pt1k.pth')), model)
    assert notes == []
    linears = linear_weight_names(model)
    assert {'cls_pt_layers.1.mlp.fc2.weight', 'cls_pt_lm_head.weight'} <= linears
    assert fitted.keys() == {name for name in state if not name.endswith('relative_position_index')}
    for name, value in fitted.items():
        expected = state[name].numpy()
        np.testing.assert_array_equal(value, expected.T if name in linears else expected, name)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in fitted.items()})
    assert compare_with_timm(config_for(V2_SPEC), read_checkpoint(str(tmp_path / 'pt1k.pth')), model,
                             mim=True) <= 1e-5


def test_optimizer_rules_cover_the_cls_branch():
    """unilm's rules: 2-D weights decay, 1-D tensors (gamma, biases, norms) do not; with a layer decay (unilm's
    pre-training uses none) the branch sits after the blocks, as every name not starting with blocks."""
    settings = param_settings(v2_model(early_layers=2, head_layers=2, shared_lm_head=False), weight_decay=0.05,
                              layer_decay=0.5)
    for name in ('cls_pt_layers.0.attn.qkv.weight', 'cls_pt_layers.1.mlp.fc2.weight', 'cls_pt_lm_head.weight'):
        assert settings[name] == {'lr_scale': 1.0, 'weight_decay': 0.05}, name
    for name in ('cls_pt_layers.0.gamma_1', 'cls_pt_layers.0.attn.q_bias', 'cls_pt_layers.1.mlp.fc2.bias',
                 'cls_pt_norm.weight', 'cls_pt_lm_head.bias'):
        assert settings[name] == {'lr_scale': 1.0, 'weight_decay': 0.0}, name


@pytest.mark.parametrize('cls_pt', [True, False])
def test_the_config_chooses_the_v2_model_with_its_branch_settings(cls_pt):
    """PRETRAIN.CLS_PT builds unilm's cls_pt model from EARLY_LAYERS, HEAD_LAYERS, SHARED_LM_HEAD; without it, v1
    (EARLY_LAYERS then means nothing, even outside the depth)."""
    config = pretrain_config(V2_SPEC)
    config.PRETRAIN.CLS_PT, config.PRETRAIN.EARLY_LAYERS = cls_pt, 3 if cls_pt else 99
    config.PRETRAIN.HEAD_LAYERS, config.PRETRAIN.SHARED_LM_HEAD = 1, False
    model = build_beit_pretrain(config)
    assert isinstance(model, BeitV2ForMaskedImageModeling) == cls_pt
    if cls_pt:
        assert model.early_layers == 3 and len(model.cls_pt_layers) == 1 and not model.shared_lm_head
        assert hasattr(model, 'cls_pt_lm_head')
        images = paddle.to_tensor(random_batch(2, TINY['IMAGE_SIZE']))
        masks = paddle.to_tensor(random_masks(2))
        positions = paddle.to_tensor(np.stack([np.flatnonzero(row) for row in random_masks(2)]))
        main, branch = model(images, masks, positions)
        assert main.shape == branch.shape == [12, VOCAB]
