"""A tiny BEiT (or BEiT + UperNet) with trained-like random weights on disk, for the prediction and export tests."""
import numpy as np
import paddle

from beit import build_beit
from beit_seg import build_beit_upernet


def trained_like_state(config, seed: int = 0) -> dict:
    """Random weights with the spread of trained ones, so that the logits of real photos differ clearly
    (a fresh model's 0.001-scaled head gives near-uniform logits whose order is noise)."""
    rng = np.random.default_rng(seed)
    paddle.seed(seed)  # the initial values are part of the result
    state = {}
    for name, tensor in build_beit(config).state_dict().items():
        value = tensor.numpy()
        scale = 1.0 if name.endswith('relative_position_bias_table') or name.startswith('head.') else 0.05
        state[name] = (value + rng.standard_normal(value.shape) * scale).astype(value.dtype)
    return state


def save_weights(path, state: dict, ema_state: dict | None = None) -> str:
    """A bare state dict, or a training checkpoint (model, model_ema, epoch) when ``ema_state`` is given."""
    tensors = {name: paddle.to_tensor(value) for name, value in state.items()}
    if ema_state is None:
        paddle.save(tensors, str(path))
    else:
        ema = {name: paddle.to_tensor(value) for name, value in ema_state.items()}
        paddle.save({'model': tensors, 'model_ema': ema, 'epoch': 3}, str(path))
    return str(path)


def trained_like_seg_state(config, seed: int = 0) -> dict:
    """A BeitUperNet's random weights with the spread of trained ones (as trained_like_state): its classifiers
    scaled up from their N(0, 0.01) init so that the classes of a map differ clearly, its BatchNorm statistics
    moved (variances kept positive)."""
    rng = np.random.default_rng(seed)
    paddle.seed(seed)
    state = {}
    for name, tensor in build_beit_upernet(config).state_dict().items():
        value = tensor.numpy()
        noise = rng.standard_normal(value.shape)
        if name.endswith('_variance'):
            value = value * np.exp(0.2 * noise)
        elif name.endswith(('relative_position_bias_table', 'conv_seg.weight')):
            value = value + noise
        else:
            value = value + noise * 0.05
        state[name] = value.astype(tensor.numpy().dtype)
    return state
