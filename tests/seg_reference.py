"""What the segmentation tests share: small segmentor configs and random weights that exercise every tensor
(BatchNorm statistics, biases and bias tables away from their init)."""
import os

import numpy as np
import paddle

from beit_seg import build_beit_upernet
from config import get_config, merge_opts, validate_config

os.environ.setdefault('HF_HUB_OFFLINE', '1')

# A tiny segmentor whose heads transformers can express (its UperHead is as wide as the encoder).
TINY = {'MODEL.EMBED_DIM': 32, 'MODEL.DEPTH': 4, 'MODEL.NUM_HEADS': 2, 'SEG.OUT_INDICES': [0, 1, 2, 3],
        'SEG.CHANNELS': 32, 'SEG.AUX_CHANNELS': 16, 'SEG.NUM_CLASSES': 5}
BASE = {'SEG.NUM_CLASSES': 7}  # the defaults are BEiT-B with unilm's heads


def seg_config(size: int, spec: dict, **extra):
    """The default config (BEiT-B, 16-pixel patches) at crop ``size`` with ``spec`` and ``extra`` (KEY=value with
    dots as '__') applied and checked."""
    config = get_config()
    opts = {'DATA.IMAGE_SIZE': size, **spec, **{key.replace('__', '.'): value for key, value in extra.items()}}
    merge_opts(config, [item for key, value in opts.items() for item in (key, str(value))])
    validate_config(config)
    return config


def random_state(model, seed: int = 0) -> dict:
    """``model``'s state dict with random values where the init is constant or too small to matter: running means
    N(0, 0.5), running and BN variances/weights and layer scales U(0.5, 1.5), biases N(0, 0.1), q/v biases and bias
    tables N(0, 0.2), the blocks' Linear weights N(0, 1/fan_in). At the init (std 0.02, layer scale 0.1) attention
    is nearly uniform and the blocks add little to the features: a q/k mix-up would change logits by < 1e-4."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        value = tensor.numpy()
        if name.endswith(('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight', 'mlp.fc2.weight')):
            value = rng.normal(0.0, value.shape[0] ** -0.5, value.shape)  # Paddle layout: [in, out]
        elif name.endswith(('_variance', 'bn.weight', 'fpn1.1.weight', 'gamma_1', 'gamma_2')):
            value = rng.uniform(0.5, 1.5, value.shape)
        elif name.endswith('_mean'):
            value = rng.normal(0.0, 0.5, value.shape)
        elif name.endswith(('relative_position_bias_table', 'q_bias', 'v_bias')):
            value = rng.normal(0.0, 0.2, value.shape)
        elif name.endswith('bias'):
            value = rng.normal(0.0, 0.1, value.shape)
        state[name] = np.asarray(value, dtype=np.float32)
    return state


def random_model(config, seed: int = 0):
    """The segmentor of ``config`` in eval mode holding random_state; returns (model, its state)."""
    paddle.seed(seed)
    model = build_beit_upernet(config)
    state = random_state(model, seed)
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
    return model.eval(), state


def images(config, batch: int = 1, seed: int = 0) -> np.ndarray:
    size = config.DATA.IMAGE_SIZE
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def paddle_logits(model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(main, auxiliary) logits in eval mode."""
    model.eval()
    with paddle.no_grad():
        return tuple(logits.numpy() for logits in model.forward_heads(paddle.to_tensor(batch)))
