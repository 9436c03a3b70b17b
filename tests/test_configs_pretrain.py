"""The BEiT v2 pre-training configs (configs/beitv2_*_pt1k.yaml) hold unilm beit2's PRETRAINING.md recipe value for
value (1600 epochs; their comment gives the 300-epoch -opts), and the tiny demo config fits its data and model."""
import re
import shlex

import pytest

from config import ConfigError, get_config, lookup, merge_opts, validate_pretraining_config
from helpers import ROOT

# unilm beit2 PRETRAINING.md's commands, with run_beitv2_pretraining.py's defaults for what they leave out
# (--rel_pos_bias: a shared table, no abs pos embed, warmup_lr 1e-6, min_lr 1e-5, weight decay 0.05 constant, colour
# jitter 0.4, train interpolation bicubic, max mask block None, codebook 8192 x 32) and DataAugmentationForBEiT's
# flip 0.5 and its ImageNet mean/std (--imagenet_default_mean_and_std).
RECIPE = {
    'DATA.IMAGE_SIZE': 224, 'DATA.INTERPOLATION': 'bicubic', 'DATA.IMAGENET_MEAN': [0.485, 0.456, 0.406],
    'DATA.IMAGENET_STD': [0.229, 0.224, 0.225], 'MODEL.PATCH_SIZE': 16, 'MODEL.QKV_BIAS': True,
    'MODEL.USE_SHARED_REL_POS_BIAS': True, 'MODEL.USE_REL_POS_BIAS': False, 'MODEL.USE_ABS_POS_EMB': False,
    'MODEL.DROPPATH': 0.1, 'PRETRAIN.TOKENIZER': 'vqkd', 'PRETRAIN.TOKENIZER_WEIGHTS': '',
    'PRETRAIN.RANDOM_TOKENIZER': False, 'PRETRAIN.VOCAB_SIZE': 8192, 'PRETRAIN.SECOND_INPUT_SIZE': 224,
    'PRETRAIN.SECOND_INTERPOLATION': 'bicubic', 'PRETRAIN.NUM_MASK_PATCHES': 75,
    'PRETRAIN.MIN_MASK_PATCHES_PER_BLOCK': 16, 'PRETRAIN.MAX_MASK_PATCHES_PER_BLOCK': 0, 'PRETRAIN.CLS_PT': True,
    'PRETRAIN.HEAD_LAYERS': 2, 'PRETRAIN.SHARED_LM_HEAD': True, 'VQKD.PATCH_SIZE': 16, 'VQKD.EMBED_DIM': 768,
    'VQKD.DEPTH': 12, 'VQKD.NUM_HEADS': 12, 'VQKD.MLP_RATIO': 4.0, 'VQKD.CODEBOOK_SIZE': 8192,
    'VQKD.CODEBOOK_DIM': 32, 'TRAIN.NUM_EPOCHS': 1600, 'TRAIN.WARMUP_EPOCHS': 10, 'TRAIN.BASE_LR': 1.5e-3,
    # unilm uses --lr as it is; this is the LR of a total batch of 2048, so unilm's at unilm's batch
    'TRAIN.LINEAR_SCALED_LR': 2048, 'TRAIN.WARMUP_START_LR': 1e-6, 'TRAIN.END_LR': 1e-5, 'TRAIN.WEIGHT_DECAY': 0.05,
    'TRAIN.LAYER_DECAY': 1.0, 'TRAIN.GRAD_CLIP': 3.0, 'TRAIN.OPTIMIZER.BETAS': [0.9, 0.999],
    'TRAIN.OPTIMIZER.EPS': 1e-8, 'TRAIN.RRC_SCALE': [0.2, 1.0], 'TRAIN.HFLIP_PROB': 0.5, 'TRAIN.RAND_AUGMENT': False,
    'TRAIN.COLOR_JITTER': 0.4, 'TRAIN.MODEL_EMA': False,
}
# per size: the model, the branch, layer scale, and the per-process batch of unilm's 16 (B) / 4 x 16 (L) GPUs
UNILM = {
    'beitv2_base_patch16_224_pt1k': ({'MODEL.EMBED_DIM': 768, 'MODEL.DEPTH': 12, 'MODEL.NUM_HEADS': 12,
                                      'PRETRAIN.EARLY_LAYERS': 9, 'MODEL.INIT_VALUES': 0.1,
                                      'DATA.BATCH_SIZE': 128}, 16),
    'beitv2_large_patch16_224_pt1k': ({'MODEL.EMBED_DIM': 1024, 'MODEL.DEPTH': 24, 'MODEL.NUM_HEADS': 16,
                                       'PRETRAIN.EARLY_LAYERS': 21, 'MODEL.INIT_VALUES': 1e-5,
                                       'DATA.BATCH_SIZE': 32}, 64),
}


def pt_config(name):
    return get_config(str(ROOT / 'configs' / f'{name}.yaml'))


def test_every_v2_pretraining_config_is_checked():
    assert sorted(UNILM) == sorted(p.stem for p in (ROOT / 'configs').glob('beitv2_*_pt1k.yaml'))


@pytest.mark.parametrize('name', sorted(UNILM))
def test_config_holds_unilms_1600_epoch_recipe(name, tmp_path):
    config, (size, processes) = pt_config(name), UNILM[name]
    expected = {**RECIPE, **size}
    assert {key: lookup(config, key) for key in expected} == expected
    assert size['DATA.BATCH_SIZE'] * processes == 2048  # unilm's total batch
    config.PRETRAIN.TOKENIZER_WEIGHTS = str(tmp_path / 'vqkd.pdparams')
    (tmp_path / 'vqkd.pdparams').write_bytes(b'weights')
    validate_pretraining_config(config)


@pytest.mark.parametrize('name', sorted(UNILM))
def test_the_comment_gives_unilms_300_epoch_recipe(name):
    """PRETRAINING.md: 300 epochs with betas (0.9, 0.98) and drop path 0."""
    text = (ROOT / 'configs' / f'{name}.yaml').read_text()
    (opts,) = re.findall(r'The 300-epoch recipe: -opts (.*)', text)
    config = pt_config(name)
    merge_opts(config, shlex.split(opts))
    assert (config.TRAIN.NUM_EPOCHS, config.TRAIN.OPTIMIZER.BETAS, config.MODEL.DROPPATH) == (300, [0.9, 0.98], 0.0)


def test_the_tiny_v2_demo_config_fits_its_model():
    """28 px images, 7 px patches: the tokenizer sees the same 28 px in 7 px patches, a 4x4 grid; its codebook is
    lm_head's vocabulary; the branch starts after 3 of the 4 blocks; the tokenizer's weights must be given (the
    demo trains them)."""
    config = get_config(str(ROOT / 'configs' / 'beitv2_tiny_pretrain_fashion_mnist.yaml'))
    pretrain, vqkd = config.PRETRAIN, config.VQKD
    assert (config.DATA.IMAGE_SIZE, config.MODEL.PATCH_SIZE, config.MODEL.DEPTH) == (28, 7, 4)
    assert (pretrain.TOKENIZER, pretrain.SECOND_INPUT_SIZE, vqkd.PATCH_SIZE) == ('vqkd', 28, 7)
    assert pretrain.VOCAB_SIZE == vqkd.CODEBOOK_SIZE == 512 and vqkd.CODEBOOK_DIM == 32
    assert (vqkd.EMBED_DIM, vqkd.DEPTH, vqkd.NUM_HEADS) == (64, 2, 2)
    assert (pretrain.CLS_PT, pretrain.EARLY_LAYERS, pretrain.HEAD_LAYERS, pretrain.SHARED_LM_HEAD) == (True, 3, 2, True)
    assert not pretrain.RANDOM_TOKENIZER and pretrain.TOKENIZER_WEIGHTS == ''
    with pytest.raises(ConfigError, match='PRETRAIN.TOKENIZER_WEIGHTS is not set'):
        validate_pretraining_config(config)
    config.PRETRAIN.RANDOM_TOKENIZER = True
    validate_pretraining_config(config)
