"""What a run does on a GPU, decided from outside the model by the device's compute capability (read from
Paddle 3.3.1's sources; no GPU could run it here, so the tests hold these rules with a stand-in capability).

- AMP: ``paddle.amp.auto_cast`` and ``decorate`` quietly run float32 for float16 below compute capability 7.0 and
  for bfloat16 below 8.0 (paddle/amp/auto_cast.py, ``_is_gpu_float16_supported``/``_is_gpu_bfloat16_supported``),
  so such a request is refused here instead of being reported as on.
- Fused attention: ``scaled_dot_product_attention`` runs a fused kernel for BEiT only as flash attention, which
  needs float16/bfloat16 and compute capability 8.0; elsewhere the memory-efficient kernel refuses a sequence
  length that is not a multiple of 8 (BEiT's 197) and sdpa falls back to a math path with the mask
  materialised, slower than the model's explicit attention.
- AMP O2 keeps the relative position bias tables in float32: their gather's gradient adds ~53 contributions per
  row, which half precision would sum with its short significand. Under auto_cast's default ``use_promote`` an
  op with a float32 input (the gather of a float32 table) runs in float32.
- DETERMINISTIC sets Paddle's deterministic cuDNN flag.
"""
import logging

import paddle

from beit import Attention, SharedRelativePositionBias
from config import ConfigError

AMP_MIN_CAPABILITY = {'float16': (7, 0), 'bfloat16': (8, 0)}  # below these Paddle's AMP runs float32
FLASH_MIN_CAPABILITY = (8, 0)
HALF_PRECISION = ('float16', 'bfloat16')
# Layer types whose own parameters stay float32 under O2. decorate's excluded_layers treats a type as that layer's
# own parameters only (an instance would keep its whole subtree, the qkv and proj Linears included, in float32).
# Attention's own parameters are its table and its q/v biases; SharedRelativePositionBias holds only its table.
O2_FLOAT32_LAYERS = (Attention, SharedRelativePositionBias)
DETERMINISTIC_FLAGS = {'FLAGS_cudnn_deterministic': True}  # the one such flag Paddle 3.3.1's Python sources read


def gpu_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the GPU this process runs on; None off a GPU."""
    if not paddle.get_device().startswith('gpu'):
        return None
    major, minor = paddle.device.cuda.get_device_capability()
    return major, minor


def check_amp_supported(dtype: str, capability: tuple[int, int] | None) -> None:
    """Refuse AMP in ``dtype`` on a GPU whose capability makes Paddle run it in float32 (ROCm builds are exempt,
    as in Paddle)."""
    if capability is None or paddle.is_compiled_with_rocm():
        return
    needed = AMP_MIN_CAPABILITY[dtype]
    if capability < needed:
        raise ConfigError(f'AMP_DTYPE {dtype} needs a GPU of compute capability {needed[0]}.{needed[1]} or newer; this '
                          f'one is {capability[0]}.{capability[1]}, where Paddle would silently train in float32'
                          + ('; use -opts AMP_DTYPE float16' if capability >= AMP_MIN_CAPABILITY['float16'] else
                             '; run without -amp'))


def fused_attention_runs(precision: str, capability: tuple[int, int] | None) -> bool:
    """Whether sdpa runs a fused (flash) kernel for a model computing in ``precision`` on ``capability``."""
    return capability is not None and precision in HALF_PRECISION and capability >= FLASH_MIN_CAPABILITY


def set_fused_attention(model: paddle.nn.Layer, precision: str, capability: tuple[int, int] | None) -> bool:
    """Let ``model``'s attention layers use sdpa only where it runs fused (they still check their bias each
    call); returns whether they do."""
    fused = fused_attention_runs(precision, capability)
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, Attention):
            layer.fused = fused
    return fused


def set_deterministic(enabled: bool, logger: logging.Logger) -> None:
    """DETERMINISTIC on a GPU: Paddle's deterministic cuDNN kernels (set before the model is built). On a CPU
    there is nothing to set: its kernels are already deterministic."""
    if not enabled:
        return
    if gpu_capability() is None:
        logger.info('DETERMINISTIC: nothing to set off a GPU (the CPU kernels are deterministic already)')
        return
    paddle.set_flags(DETERMINISTIC_FLAGS)
    logger.info(f'DETERMINISTIC: set {", ".join(DETERMINISTIC_FLAGS)}; kernels that add with atomics (the '
                'backward of the bias-table gather) may still differ from run to run')

