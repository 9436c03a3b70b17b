"""Layer ops whose CPU backward passes are GEMMs: the same function and gradients as Paddle's ops, faster on CPU,
and ``use_cpu_kernels``, which puts them into a built BEiT (the model files themselves use Paddle's ops only).

Paddle 3.3.1's CPU kernels that sum a gradient over broadcast axes are slow (at BEiT-B shapes a bias gradient,
a column sum, took longer than the GEMM producing it: docs/cpu_speed.md), and so is the add that broadcasts a
bias. A column sum is a GEMM with a ones row (< 1 ms), so each
function here computes its parameter gradients that way. LayerNorm keeps Paddle's kernels for the
normalisation and its input gradient (fast without the affine parameters), recomputing the normalised input in
the backward pass rather than keeping it. ``permute`` gives contiguous transposes. (A hand-written GELU backward
built from Paddle ops was measured too: slower than Paddle's own, so GELU stays Paddle's.)

The autograd versions run only in dygraph on CPU. On GPU, and in static graphs (``paddle.jit.to_static``,
export), the plain Paddle ops are used, so exported programs keep the patterns Paddle Inference fuses.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from beit import Attention, Block
from paddle_internals import layer_norm_epsilon


def _on_cpu_dygraph(x: paddle.Tensor) -> bool:
    return paddle.in_dynamic_mode() and x.place.is_cpu_place()


def sum_over_leading_axes(t: paddle.Tensor, kept_axes: int = 1) -> paddle.Tensor:
    """Sum over all but the last ``kept_axes`` axes, as one GEMM with a ones row: [1, prod(trailing)]."""
    rows = math.prod(t.shape[:t.ndim - kept_axes])
    flat = t.reshape([rows, -1])
    return paddle.matmul(paddle.ones([1, rows], dtype=t.dtype), flat)


class _Linear(PyLayer):
    """Gradients only for the inputs that need one (Paddle requires None for the others): a linear probe's
    features and a frozen layer's weights need none, and their GEMMs are skipped."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape([-1, x.shape[-1]])
        out = paddle.matmul(rows, weight) if bias is None else paddle.addmm(bias, rows, weight)
        ctx.save_for_backward(rows, weight)
        ctx.x_shape = x.shape
        ctx.needs_grad = [not tensor.stop_gradient for tensor in (x, weight, bias) if tensor is not None]
        return out.reshape([*x.shape[:-1], weight.shape[1]])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensor()
        grad = grad.reshape([-1, grad.shape[-1]])
        grads = [lambda: paddle.matmul(grad, weight, transpose_y=True).reshape(ctx.x_shape),
                 lambda: paddle.matmul(rows, grad, transpose_x=True),
                 lambda: sum_over_leading_axes(grad).reshape([-1])]
        return tuple(compute() if needed else None for compute, needed in zip(grads, ctx.needs_grad))


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
    """``F.linear`` (weight [in, out])."""
    if _on_cpu_dygraph(x):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _ScaleChannels(PyLayer):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x, scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensor()
        return grad * scale, sum_over_leading_axes(x * grad).reshape([-1])


def scale_channels(x: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """``x * scale`` with a per-channel (last axis) scale, e.g. layer scale."""
    if _on_cpu_dygraph(x):
        return _ScaleChannels.apply(x, scale)
    return x * scale


class _AddBroadcast(PyLayer):
    @staticmethod
    def forward(ctx, x, bias):
        ctx.bias_shape = bias.shape
        return x + bias.expand(x.shape)  # a same-shape add: the broadcasting add kernel is ~7x slower

    @staticmethod
    def backward(ctx, grad):
        kept = len(ctx.bias_shape) - 1
        return grad, sum_over_leading_axes(grad, kept).reshape(ctx.bias_shape)


def add_broadcast(x: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``x + bias`` where ``bias`` is [1, *x.shape[1:]] (one bias shared by the batch)."""
    if _on_cpu_dygraph(x):
        return _AddBroadcast.apply(x, bias)
    return x + bias


class _LayerNorm(PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensor()
        with paddle.enable_grad():  # Paddle's kernels for the normalisation and its input gradient
            x = x.detach()
            x.stop_gradient = False
            normed = F.layer_norm(x, x.shape[-1:], epsilon=ctx.epsilon)
            grad_x, = paddle.grad(normed, x, grad * weight)
        return (grad_x, sum_over_leading_axes(grad * normed.detach()).reshape([-1]),
                sum_over_leading_axes(grad).reshape([-1]))


def layer_norm(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last axis with an affine weight and bias."""
    if _on_cpu_dygraph(x):
        return _LayerNorm.apply(x, weight, bias, epsilon)
    return F.layer_norm(x, x.shape[-1:], weight, bias, epsilon)


class _Permute(PyLayer):
    @staticmethod
    def forward(ctx, x, perm):
        ctx.inverse = [perm.index(axis) for axis in range(len(perm))]
        return _transpose_copy(x, perm)

    @staticmethod
    def backward(ctx, grad):
        return _transpose_copy(grad, ctx.inverse)


def _transpose_copy(x: paddle.Tensor, perm: list) -> paddle.Tensor:
    """A contiguous transpose by einsum's transpose kernel (no autograd here: PyLayer runs it without)."""
    axes = 'abcdefgh'[:x.ndim]
    return paddle.einsum(f'{axes}->{"".join(axes[axis] for axis in perm)}', x)


def permute(x: paddle.Tensor, perm: list) -> paddle.Tensor:
    """``x.transpose(perm)`` as a contiguous tensor: Paddle's transpose gives a strided view, which the next op
    copies with a strided-copy kernel ~40x slower than a transpose kernel on CPU; einsum under autograd keeps a
    cache of its operands (~360 MB more for a BEiT-B training step), this keeps nothing."""
    if _on_cpu_dygraph(x):
        return _Permute.apply(x, perm)
    return x.transpose(perm)


class CpuLinear(nn.Linear):
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return linear(x, self.weight, self.bias)


class CpuLayerNorm(nn.LayerNorm):
    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return layer_norm(x, self.weight, self.bias, layer_norm_epsilon(self))


class CpuAttention(Attention):
    """beit.Attention's math on this module's ops: the qkv GEMM with a GEMM-summed bias gradient, contiguous
    transposes, and a bias add whose gradient is a GEMM."""

    _linear = staticmethod(linear)
    _permute = staticmethod(permute)
    _add_bias = staticmethod(add_broadcast)


class CpuBlock(Block):
    @staticmethod
    def _layer_scale(x: paddle.Tensor, gamma: paddle.Tensor | None) -> paddle.Tensor:
        return x if gamma is None else scale_channels(x, gamma)


_CPU_VERSIONS = {nn.Linear: CpuLinear, nn.LayerNorm: CpuLayerNorm, Attention: CpuAttention, Block: CpuBlock}


def use_cpu_kernels(model: nn.Layer) -> nn.Layer:
    """Give every Linear, LayerNorm, attention and block of ``model`` (in place) the version computed by this
    module's kernels: the same parameters, names and function. The layers still run Paddle's ops off the CPU and
    in static graphs, so the model stays right to move, export or compile."""
    for layer in model.sublayers(include_self=True):
        faster = _CPU_VERSIONS.get(type(layer))
        if faster is not None:
            layer.__class__ = faster
    return model
