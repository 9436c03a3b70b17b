"""The fine-tuning optimizer: AdamW with unilm's layer-wise LR decay and weight-decay exclusion, global-norm
clipping, and the per-iteration warmup + cosine learning-rate schedule.

Both rules are decided from structured parameter names (``model.named_parameters()``, e.g. ``blocks.3.mlp.fc1.bias``)
and handed to Paddle per parameter object: the LR scale as ``param.optimize_attr['learning_rate']``, which AdamW
multiplies into the scheduled LR, and the decay flag through ``apply_decay_param_fun``. One parameter list (no
parameter groups) keeps ``ClipGradByGlobalNorm`` global: Paddle clips each parameter group on its own.
"""
import math

import paddle
import paddle.nn as nn
from paddle.optimizer.lr import LRScheduler

from beit import lr_scale_for_param

HALF_DTYPES = (paddle.float16, paddle.bfloat16)


def decays_weight(name: str, param: paddle.Tensor, no_weight_decay_names: set) -> bool:
    """unilm's rule: no decay on 1-D tensors (norms, layer scale, q/v biases), biases and the model's named set."""
    return not (param.ndim <= 1 or name.endswith('.bias') or name in no_weight_decay_names)


def param_settings(model: nn.Layer, weight_decay: float, layer_decay: float) -> dict:
    """{structured name: {"lr_scale": ..., "weight_decay": ...}} for every trainable parameter of a BEiT."""
    depth = model.get_num_layers()
    skip = set(model.no_weight_decay())
    return {name: {'lr_scale': lr_scale_for_param(name, depth, layer_decay),
                   'weight_decay': weight_decay if decays_weight(name, param, skip) else 0.0}
            for name, param in model.named_parameters() if not param.stop_gradient}


def linear_scaling(config, world_size: int, reference_batch: float) -> float:
    """The total batch (BATCH_SIZE x processes x ACCUM_ITER) / ``reference_batch``, the batch a recipe's LR is for
    (the PaddleViT convention); 1 when ``reference_batch`` is 0 (the LR as given)."""
    if reference_batch <= 0:
        return 1.0
    return config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUM_ITER / reference_batch


def scaled_learning_rates(config, world_size: int) -> tuple[float, float, float]:
    """(peak, warmup start, end) LR, each scaled by linear_scaling for TRAIN.LINEAR_SCALED_LR."""
    train = config.TRAIN
    factor = linear_scaling(config, world_size, train.LINEAR_SCALED_LR)
    return train.BASE_LR * factor, train.WARMUP_START_LR * factor, train.END_LR * factor


def warmup_cosine_lr(step: int, peak: float, warmup_start: float, end: float, warmup_steps: int,
                     total_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear from warmup_start towards peak over warmup_steps, then a
    half cosine from peak down to end at total_steps."""
    if step < warmup_steps:
        return warmup_start + (peak - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LRScheduler):
    """warmup_cosine_lr as a Paddle scheduler, stepped once per optimizer step; ``last_epoch`` counts steps."""

    def __init__(self, peak: float, warmup_start: float, end: float, warmup_steps: int, total_steps: int,
                 last_step: int = -1):
        self.peak = peak
        self.warmup_start = warmup_start
        self.end = end
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        super().__init__(learning_rate=peak, last_epoch=last_step)

    def get_lr(self) -> float:
        return warmup_cosine_lr(self.last_epoch, self.peak, self.warmup_start, self.end, self.warmup_steps,
                                self.total_steps)


def build_lr_scheduler(config, steps_per_epoch: int, world_size: int) -> WarmupCosineLR:
    """The schedule over TRAIN.NUM_EPOCHS epochs of ``steps_per_epoch`` optimizer steps, positioned after
    TRAIN.LAST_EPOCH finished epochs."""
    peak, warmup_start, end = scaled_learning_rates(config, world_size)
    return WarmupCosineLR(peak, warmup_start, end, warmup_steps=config.TRAIN.WARMUP_EPOCHS * steps_per_epoch,
                          total_steps=config.TRAIN.NUM_EPOCHS * steps_per_epoch,
                          last_step=config.TRAIN.LAST_EPOCH * steps_per_epoch - 1)


def build_optimizer(config, model: nn.Layer, lr_scheduler: LRScheduler) -> tuple[paddle.optimizer.AdamW, dict]:
    """AdamW over ``model``'s trainable parameters with per-parameter LR scale and decay flag; also returns the
    settings table (structured name -> lr_scale, weight_decay) it applied."""
    train = config.TRAIN
    settings = param_settings(model, train.WEIGHT_DECAY, train.LAYER_DECAY)
    params = dict(model.named_parameters())
    decayed = set()
    for name, setting in settings.items():
        params[name].optimize_attr['learning_rate'] = setting['lr_scale']
        if setting['weight_decay'] > 0:
            decayed.add(params[name].name)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr_scheduler, parameters=[params[name] for name in settings],
        beta1=train.OPTIMIZER.BETAS[0], beta2=train.OPTIMIZER.BETAS[1], epsilon=train.OPTIMIZER.EPS,
        weight_decay=train.WEIGHT_DECAY, apply_decay_param_fun=decayed.__contains__,
        grad_clip=nn.ClipGradByGlobalNorm(train.GRAD_CLIP) if train.GRAD_CLIP > 0 else None)
    return optimizer, settings


def build_training_optimizer(config, model: nn.Layer, steps_per_epoch: int,
                             world_size: int) -> tuple[paddle.optimizer.AdamW, WarmupCosineLR, dict]:
    """(optimizer, scheduler, settings table) of fine-tuning and pre-training: build_optimizer on build_lr_scheduler."""
    lr_scheduler = build_lr_scheduler(config, steps_per_epoch, world_size)
    optimizer, settings = build_optimizer(config, model, lr_scheduler)
    return optimizer, lr_scheduler, settings


def float32_weights(model: nn.Layer, optimizer: paddle.optimizer.Optimizer, *, o2: bool) -> dict:
    """``model``'s state dict as the optimizer updates it, in float32. Under AMP O2 (``o2``) the float16/bfloat16
    parameters are copies and their float32 master weights in the optimizer state (kept by parameter name) take
    their place. Nowhere else: a state dict keeps returning master weights it was given (a resumed O2
    checkpoint) that AdamW no longer updates, and parameters kept in float32 under O2 have none."""
    masters = optimizer.state_dict().get('master_weights', {}) if o2 else {}
    state = model.state_dict()
    for name, param in model.named_parameters():
        if param.dtype in HALF_DTYPES and param.name in masters:
            state[name] = masters[param.name]
    return {name: tensor.astype('float32') if tensor.dtype in HALF_DTYPES else tensor
            for name, tensor in state.items()}
