"""ModelEma: starts as an exact copy, averages floating-point weights only, leaves index buffers alone."""
import numpy as np
import paddle
import pytest

from beit import build_beit, relative_position_index
from config import get_config
from helpers import TINY_CONFIG
from model_ema import ModelEma


@pytest.fixture()
def model():
    paddle.seed(0)
    return build_beit(get_config(TINY_CONFIG))


def test_starts_equal_to_the_model_and_is_independent(model):
    ema = ModelEma(model, 0.9)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(ema.state_dict()[name].numpy(), value.numpy())
    model.head.bias.set_value(model.head.bias + 1.0)
    assert not np.allclose(ema.module.head.bias.numpy(), model.head.bias.numpy())
    assert all(param.stop_gradient for param in ema.module.parameters())
    assert not ema.module.training


def test_update_is_the_exponential_average(model):
    ema = ModelEma(model, 0.75)
    before = {name: value.numpy().copy() for name, value in ema.state_dict().items()}
    for param in model.parameters():
        param.set_value(param + 2.0)
    ema.update(model.state_dict())
    current = model.state_dict()
    for name, value in ema.state_dict().items():
        np.testing.assert_allclose(value.numpy(), 0.75 * before[name] + 0.25 * current[name].numpy(), atol=1e-6)


def test_index_buffers_are_constants_never_averaged(model):
    ema = ModelEma(model, 0.5)
    expected = relative_position_index(model.patch_embed.grid).reshape(-1)
    for block in model.blocks:  # corrupt the live model's index: the EMA must not take it up
        block.attn.relative_position_index.set_value(paddle.zeros_like(block.attn.relative_position_index))
    ema.update(model.state_dict())
    assert not any(name.endswith('relative_position_index') for name in ema.averaged_tensors())
    for block in ema.module.blocks:
        index = block.attn.relative_position_index
        assert index.dtype == paddle.int64
        np.testing.assert_array_equal(index.numpy(), expected)


def test_rejects_a_decay_outside_zero_one(model):
    with pytest.raises(ValueError, match='decay'):
        ModelEma(model, 1.5)
