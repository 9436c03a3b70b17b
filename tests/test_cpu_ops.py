"""cpu_ops: each autograd function equals Paddle's own op, forward and every gradient, on CPU."""
from collections import Counter

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import cpu_ops


def _tensor(rng, shape, dtype):
    tensor = paddle.to_tensor(rng.standard_normal(shape).astype(dtype))
    tensor.stop_gradient = False
    return tensor


def _output_and_grads(fn, inputs, upstream):
    for tensor in inputs:
        tensor.clear_gradient()
    out = fn(*inputs)
    out.backward(upstream)
    return out.numpy(), [tensor.grad.numpy() for tensor in inputs]


CASES = {  # name -> (function under test, Paddle's op, input shapes)
    'linear 3-D input': (cpu_ops.linear, F.linear, [(2, 5, 6), (6, 4), (4,)]),
    'linear 2-D input': (cpu_ops.linear, F.linear, [(7, 6), (6, 3), (3,)]),
    'scale_channels': (cpu_ops.scale_channels, lambda x, s: x * s, [(2, 5, 6), (6,)]),
    'add_broadcast': (cpu_ops.add_broadcast, lambda x, b: x + b, [(3, 2, 5, 5), (1, 2, 5, 5)]),
    'layer_norm': (lambda x, w, b: cpu_ops.layer_norm(x, w, b, 1e-6),
                   lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), [(2, 5, 6), (6,), (6,)]),
    'permute': (lambda x: cpu_ops.permute(x, [2, 0, 3, 1]), lambda x: x.transpose([2, 0, 3, 1]), [(2, 3, 4, 5)]),
}


@pytest.mark.parametrize('dtype, rtol', [('float64', 1e-12), ('float32', 1e-5)])
@pytest.mark.parametrize('case', CASES)
def test_same_function_and_gradients_as_paddle(case, dtype, rtol):
    ours, reference, shapes = CASES[case]
    rng = np.random.default_rng(0)
    inputs = [_tensor(rng, shape, dtype) for shape in shapes]
    upstream = paddle.to_tensor(rng.standard_normal(reference(*inputs).shape).astype(dtype))
    expected_out, expected_grads = _output_and_grads(reference, inputs, upstream)
    out, grads = _output_and_grads(ours, inputs, upstream)
    np.testing.assert_allclose(out, expected_out, rtol=rtol, atol=rtol)
    for index, (grad, expected) in enumerate(zip(grads, expected_grads, strict=True)):
        np.testing.assert_allclose(grad, expected, rtol=rtol, atol=rtol, err_msg=f'gradient of input {index}')


def test_linear_without_bias():
    rng = np.random.default_rng(1)
    x, weight = _tensor(rng, (4, 3, 5), 'float64'), _tensor(rng, (5, 2), 'float64')
    upstream = paddle.to_tensor(rng.standard_normal((4, 3, 2)))
    out, (grad_x, grad_w) = _output_and_grads(lambda a, w: cpu_ops.linear(a, w, None), [x, weight], upstream)
    np.testing.assert_allclose(out, x.numpy() @ weight.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad_x, upstream.numpy() @ weight.numpy().T, rtol=1e-12)
    np.testing.assert_allclose(grad_w, np.einsum('bni,bno->io', x.numpy(), upstream.numpy()), rtol=1e-12)


@pytest.mark.parametrize('frozen', ['input', 'weight'])
def test_linear_gives_no_gradient_to_what_needs_none(frozen):
    """A linear probe's input features (and a frozen layer's weight) carry stop_gradient: Paddle requires the
    autograd function to return None for them, and the other gradients stay Paddle's."""
    rng = np.random.default_rng(3)
    x, weight, bias = _tensor(rng, (4, 3, 5), 'float64'), _tensor(rng, (5, 2), 'float64'), _tensor(rng, (2,), 'float64')
    (x if frozen == 'input' else weight).stop_gradient = True
    upstream = paddle.to_tensor(rng.standard_normal((4, 3, 2)))
    expected = [paddle.grad(F.linear(x, weight, bias), t, upstream)[0].numpy() for t in (x, weight, bias)
                if not t.stop_gradient]
    cpu_ops.linear(x, weight, bias).backward(upstream)
    grads = [t.grad for t in (x, weight, bias)]
    assert grads[0 if frozen == 'input' else 1] is None
    for grad, value in zip([g for g in grads if g is not None], expected, strict=True):
        np.testing.assert_allclose(grad.numpy(), value, rtol=1e-12)


def test_sum_over_leading_axes_is_a_column_sum():
    values = np.random.default_rng(2).standard_normal((3, 4, 5))
    summed = cpu_ops.sum_over_leading_axes(paddle.to_tensor(values), kept_axes=2)
    np.testing.assert_allclose(summed.numpy().reshape(4, 5), values.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cpu_ops.sum_over_leading_axes(paddle.to_tensor(values)).numpy().ravel(),
                               values.reshape(-1, 5).sum(axis=0), rtol=1e-12)


def _which_path(t):
    """1 where cpu_ops would use its autograd functions, 0 where Paddle's ops."""
    return t * 0 + 1 if cpu_ops._on_cpu_dygraph(t) else t * 0


def test_autograd_functions_run_in_dygraph_on_cpu_only():
    """A static program (to_static, export) gets Paddle's ops, whose patterns Paddle Inference fuses."""
    x = paddle.ones([2, 3])
    assert _which_path(x).numpy().min() == 1
    assert paddle.jit.to_static(_which_path, full_graph=True)(x).numpy().max() == 0


def test_cpu_attention_is_beits_attention_on_this_modules_ops(monkeypatch):
    """CpuAttention holds no copy of the attention math, only beit.Attention's op hooks; with them it computes
    beit.Attention's output and gradients (a block's own and a shared bias, attention dropout off), and its qkv
    GEMM, transposes and bias add run through cpu_ops' autograd functions."""
    from beit import Attention
    own = {name for name in vars(cpu_ops.CpuAttention) if not name.startswith('__')}
    assert own == {'_linear', '_permute', '_add_bias'}
    calls = []
    for function in (cpu_ops._Linear, cpu_ops._Permute, cpu_ops._AddBroadcast):
        monkeypatch.setattr(function, 'apply', _counted(function.__name__, function.apply, calls))
    rng = np.random.default_rng(0)
    paddle.seed(0)
    plain = Attention(8, 2, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, grid=(2, 2), fused_attn=False)
    state = {name: paddle.to_tensor(rng.standard_normal(value.shape).astype('float32'))
             for name, value in plain.state_dict().items()}
    plain.set_state_dict(state)
    fast = Attention(8, 2, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, grid=(2, 2), fused_attn=False)
    fast.set_state_dict(state)
    cpu_ops.use_cpu_kernels(fast)
    x, shared = _tensor(rng, (3, 5, 8), 'float32'), _tensor(rng, (1, 2, 5, 5), 'float32')
    upstream = paddle.to_tensor(rng.standard_normal((3, 5, 8)).astype('float32'))
    results, counts = [], []
    for layer in (plain, fast):
        out, (grad_x, grad_shared) = _output_and_grads(layer, [x, shared], upstream)
        results.append([out, grad_x, grad_shared, *(p.grad.numpy() for p in layer.parameters())])
        counts.append(Counter(calls))
        calls.clear()
    assert counts == [Counter(), Counter({'_Linear': 2, '_Permute': 2, '_AddBroadcast': 1})]  # qkv and proj
    for ours, expected in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def _counted(name, apply, calls):
    def counting(*args):
        calls.append(name)
        return apply(*args)
    return counting
