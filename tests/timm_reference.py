"""timm's BEiT as the oracle: random-weight reference models, checkpoints on disk, matching configs."""
import argparse
import collections

import numpy as np
import paddle
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.beit import Beit as TimmBeit

from config import get_config, set_value, validate_config

# A small architecture; each test overrides what it varies. Keys are our config keys (without MODEL./DATA.).
TINY = {'IMAGE_SIZE': 32, 'PATCH_SIZE': 8, 'EMBED_DIM': 32, 'DEPTH': 2, 'NUM_HEADS': 2, 'MLP_RATIO': 4.0,
        'NUM_CLASSES': 7, 'QKV_BIAS': True, 'INIT_VALUES': 0.1, 'USE_ABS_POS_EMB': False,
        'USE_REL_POS_BIAS': True, 'USE_SHARED_REL_POS_BIAS': False, 'USE_MEAN_POOLING': True}
DATA_KEYS = ('IMAGE_SIZE',)
# unilm's pre-training layout: one shared relative position bias, the final norm on all tokens.
PRETRAIN_SPEC = {**TINY, 'USE_REL_POS_BIAS': False, 'USE_SHARED_REL_POS_BIAS': True, 'USE_MEAN_POOLING': False}
PRETRAIN_VOCAB = 50
CHECKPOINT_FORMATS = ('unilm.pth', 'deepspeed.pth', 'module.pth', 'timm.pth', 'timm.bin', 'timm.safetensors')


def timm_model(spec: dict, seed: int = 0) -> TimmBeit:
    """timm's Beit with every parameter (zero-initialised tables and biases too) set to random values."""
    torch.manual_seed(seed)
    model = TimmBeit(img_size=spec['IMAGE_SIZE'], patch_size=spec['PATCH_SIZE'], num_classes=spec['NUM_CLASSES'],
                     embed_dim=spec['EMBED_DIM'], depth=spec['DEPTH'], num_heads=spec['NUM_HEADS'],
                     mlp_ratio=spec['MLP_RATIO'], qkv_bias=spec['QKV_BIAS'], init_values=spec['INIT_VALUES'],
                     use_abs_pos_emb=spec['USE_ABS_POS_EMB'], use_rel_pos_bias=spec['USE_REL_POS_BIAS'],
                     use_shared_rel_pos_bias=spec['USE_SHARED_REL_POS_BIAS'],
                     global_pool='avg' if spec['USE_MEAN_POOLING'] else 'token')
    return with_trained_like_noise(model)


def timm_zoo_model(name: str, seed: int = 0) -> TimmBeit:
    """A model of timm's registry (``beitv2_large_patch16_224``: its own architecture settings, not ours) with
    random weights as timm_model's."""
    torch.manual_seed(seed)
    return with_trained_like_noise(timm.create_model(name, pretrained=False))


def with_trained_like_noise(model: TimmBeit) -> TimmBeit:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * _noise_scale(name))
    return model.eval()


def _noise_scale(name: str) -> float:
    """Trained-like magnitudes, so that every part (cls relations included) moves the logits visibly."""
    if name.endswith('relative_position_bias_table'):
        return 1.0
    if 'gamma' in name or name.endswith(('q_bias', 'v_bias', 'mask_token')):
        return 0.5
    if 'lm_head' in name:  # the pre-training models' (tests/beit2_reference.py)
        return 0.2
    return 0.05


def config_for(spec: dict, cfg_file=None, **extra):
    """Our config for the same architecture."""
    config = get_config(cfg_file)
    for key, value in {**spec, **extra}.items():
        set_value(config, f'{"DATA" if key in DATA_KEYS else "MODEL"}.{key}', value, 'test spec')
    validate_config(config)
    return config


def torch_state_dict(model: torch.nn.Module) -> dict:
    """What a checkpoint file holds: parameters and persistent buffers, as unilm would also add the index."""
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def unilm_state_dict(model: TimmBeit) -> dict:
    """What unilm's own files hold: timm's state dict plus each block's relative_position_index, a buffer unilm
    saves and timm does not."""
    indices = {name: index.clone() for name, index in model.named_buffers()
               if name.endswith('relative_position_index')}
    return {**torch_state_dict(model), **indices}


def pretraining_checkpoint(seed: int = 0) -> tuple[TimmBeit, dict]:
    """A unilm pre-training state dict with random weights: timm's encoder of PRETRAIN_SPEC (no head) plus
    ``mask_token``, ``lm_head`` over PRETRAIN_VOCAB tokens and the shared table's index buffer, as unilm saves
    them. Returns (timm model, torch state dict)."""
    reference = timm_model(PRETRAIN_SPEC, seed)
    state = {name: value for name, value in torch_state_dict(reference).items() if not name.startswith('head.')}
    generator = torch.Generator().manual_seed(seed)
    dim, grid = PRETRAIN_SPEC['EMBED_DIM'], PRETRAIN_SPEC['IMAGE_SIZE'] // PRETRAIN_SPEC['PATCH_SIZE']
    state['mask_token'] = torch.randn(1, 1, dim, generator=generator)
    state['lm_head.weight'] = torch.randn(PRETRAIN_VOCAB, dim, generator=generator) * 0.2
    state['lm_head.bias'] = torch.randn(PRETRAIN_VOCAB, generator=generator) * 0.2
    state['rel_pos_bias.relative_position_index'] = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    return reference, state


def save_checkpoint(state_dict: dict, path, fmt: str) -> None:
    """Write ``state_dict`` the way unilm (training checkpoint) or timm (bare weights) publish it."""
    if fmt == 'unilm.pth':
        torch.save({'model': state_dict, 'epoch': 29, 'args': argparse.Namespace(lr=2e-5)}, path)
    elif fmt == 'deepspeed.pth':  # unilm's --enable_deepspeed runs: DeepSpeed's layout, names without module.
        shapes = collections.OrderedDict((name, value.shape) for name, value in state_dict.items())
        torch.save({'module': state_dict, 'buffer_names': [], 'optimizer': None, 'param_shapes': [shapes],
                    'lr_scheduler': None, 'global_steps': 12_500, 'dp_world_size': 8, 'ds_version': '0.4.0',
                    'epoch': 'best', 'args': argparse.Namespace(lr=5e-4)}, path)
    elif fmt == 'module.pth':
        torch.save({'module': {f'module.{name}': value for name, value in state_dict.items()}}, path)
    elif fmt in ('timm.pth', 'timm.bin'):
        torch.save(state_dict, path)
    elif fmt == 'timm.safetensors':
        save_file({name: value.contiguous() for name, value in state_dict.items()}, str(path))
    else:
        raise ValueError(fmt)


def photo_batch(paths, size: int) -> np.ndarray:
    """Real photos as model inputs: RGB, bicubic resize, scaled to [-1, 1] (BEiT's mean = std = 0.5)."""
    images = [np.asarray(Image.open(p).convert('RGB').resize((size, size), Image.BICUBIC), np.float32) for p in paths]
    return ((np.stack(images) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32)


def random_batch(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch_size, 3, size, size)).astype(np.float32)


def logits_difference(reference: torch.nn.Module, model: paddle.nn.Layer, images: np.ndarray,
                      tokens: bool = True) -> float:
    """Max abs difference of the logits and, with ``tokens``, of every output token (the cls token too, unlike the
    logits). The logits alone suit deep random models: the unnormalised tokens after 24 blocks reach ~50, where
    fp32 rounding alone differs by ~1e-4."""
    model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(images)
        expected = [reference(inputs).numpy(), *([reference.forward_features(inputs).numpy()] if tokens else [])]
    with paddle.no_grad():
        inputs = paddle.to_tensor(images)
        actual = [model(inputs).numpy(), *([model.forward_tokens(inputs).numpy()] if tokens else [])]
    for ours, theirs in zip(actual, expected):
        assert ours.shape == theirs.shape
    return max(float(np.abs(ours - theirs).max()) for ours, theirs in zip(actual, expected))
