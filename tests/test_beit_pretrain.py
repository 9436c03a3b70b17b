"""The MIM pre-training model against independent computations: timm's BEiT blocks with the mask token
substituted in torch, the fine-tuning encoder, unilm's initialisation and names."""
import numpy as np
import paddle
import pytest
import torch
import torch.nn.functional as TF

from beit import adapt_state_dict, build_beit
from beit_pretrain import BeitForMaskedImageModeling, build_beit_pretrain
from load_pytorch_weights import convert_state_dict
from optim import param_settings
from timm_reference import PRETRAIN_SPEC as SPEC
from timm_reference import PRETRAIN_VOCAB as VOCAB
from timm_reference import TINY, config_for, pretraining_checkpoint, random_batch

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


def test_names_are_unilms_and_initialisation_follows_it():
    paddle.seed(0)
    config = config_for({**TINY, 'EMBED_DIM': 256, 'DEPTH': 4, 'USE_REL_POS_BIAS': False,
                         'USE_SHARED_REL_POS_BIAS': True})
    config.PRETRAIN.VOCAB_SIZE = 8192
    model = build_beit_pretrain(config)
    block_keys = {f'blocks.{i}.{key}' for i in range(4) for key in UNILM_BLOCK_KEYS}
    assert set(model.state_dict()) == UNILM_PRETRAIN_KEYS | block_keys
    assert model.lm_head.weight.shape == [256, 8192]  # Paddle's [in, out]
    for name in ('lm_head.weight', 'mask_token', 'cls_token', 'blocks.0.attn.qkv.weight'):
        value = model.state_dict()[name].numpy()
        assert value.std() == pytest.approx(0.02, rel=0.15), name  # the tokens: 256 draws
    np.testing.assert_array_equal(model.lm_head.bias.numpy(), 0)  # no head init scale in pre-training
    for layer_id, block in enumerate(model.blocks, start=1):
        std = block.mlp.fc2.weight.numpy().std()
        assert std == pytest.approx(0.02 / np.sqrt(2 * layer_id), rel=0.1)
        np.testing.assert_allclose(block.gamma_1.numpy(), 0.1)
    np.testing.assert_array_equal(model.norm.weight.numpy(), 1)


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
