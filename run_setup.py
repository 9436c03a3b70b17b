"""The in-memory parts of a run, built from its config: the process world, AMP as it will run, the model as this
device computes it, the data sets, the trainer, and the model that evaluation runs (job.py puts them together)."""
import logging
import os
from typing import NamedTuple

import paddle
import paddle.distributed as dist

import cpu_ops
import gpu_runtime
from config import ConfigError
from datasets import get_dataloader
from engine import Amp, Objective, Trainer, World
from inference import PredictorAsModel
from model_ema import ModelEma
from paddle_internals import LossScaler
from sample_sources import DatasetError
from sample_table import lists_checked_once_per_machine
from tasks import Task

FLOAT32 = Amp()  # AMP off


def init_world(multi_process: bool) -> World:
    """World of a process started by paddle.distributed.launch or spawn (their environment says so), else one."""
    size = int(os.environ.get('PADDLE_TRAINERS_NUM', '1'))
    if not multi_process or size < 2:
        return World()
    dist.init_parallel_env()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get('PADDLE_LOCAL_SIZE', size)),
                 int(os.environ.get('PADDLE_LOCAL_RANK', rank)))


def amp_for(config, logger: logging.Logger) -> Amp:
    """AMP as it will run, said in the log; raises ConfigError for AMP the GPU cannot do (Paddle would quietly
    run it in float32)."""
    if not config.AMP:
        return Amp()
    if paddle.get_device().startswith('cpu'):
        logger.info('AMP requested, but Paddle\'s AMP does nothing on CPU: running in float32')
        return Amp()
    capability = gpu_runtime.gpu_capability()
    gpu_runtime.check_amp_supported(config.AMP_DTYPE, capability)
    where = f'compute capability {capability[0]}.{capability[1]}' if capability else paddle.get_device()
    logger.info(f'AMP {config.AMP_LEVEL} in {config.AMP_DTYPE} on {where}')
    return Amp(True, config.AMP_LEVEL, config.AMP_DTYPE)


def decorate_o2(model, amp: Amp, optimizer=None):
    """paddle.amp.decorate of ``model`` (and ``optimizer``) for O2, the relative position bias tables kept in
    float32 (gpu_runtime.O2_FLOAT32_LAYERS); checkpoints are saved in float32."""
    return paddle.amp.decorate(models=model, optimizers=optimizer, level='O2', dtype=amp.dtype, save_dtype='float32',
                               excluded_layers=list(gpu_runtime.O2_FLOAT32_LAYERS))


def build_model(config, task: Task, amp: Amp = FLOAT32):
    """The task's model; in CPU dygraph with CPU_KERNELS, computed by cpu_ops' kernels (same function, faster
    gradients): the one place they are applied to a run's model. MODEL.FUSED_ATTN holds only where sdpa runs a
    fused kernel for the run's precision (``amp``) on this device (gpu_runtime.fused_attention_runs)."""
    model = task.build_model(config)
    if config.CPU_KERNELS and paddle.get_device().startswith('cpu'):
        cpu_ops.use_cpu_kernels(model)
    if config.MODEL.FUSED_ATTN:
        gpu_runtime.set_fused_attention(model, amp.precision, gpu_runtime.gpu_capability())
    return model


def fused_attention_note(config, model) -> str:
    """What MODEL.FUSED_ATTN does in this run, for the log ('' when it is off)."""
    if not config.MODEL.FUSED_ATTN:
        return ''
    if any(getattr(layer, 'fused', False) for layer in model.sublayers(include_self=True)):
        return 'MODEL.FUSED_ATTN: scaled_dot_product_attention (flash) where the attention bias is not trained'
    return ('MODEL.FUSED_ATTN: the explicit attention (sdpa runs a fused kernel only in float16/bfloat16 on a GPU of '
            'compute capability 8.0 or newer, and its math fallback is slower)')


def evaluation_model(config, model):
    """The loaded model, or its exported copy in Paddle Inference when EVAL_BACKEND asks for one."""
    backend = config.EVAL_BACKEND
    if backend == 'dygraph':
        return model
    if not paddle.get_device().startswith('cpu'):
        raise ConfigError(f'EVAL_BACKEND {backend} runs Paddle Inference on the CPU; on {paddle.get_device()} '
                          'use EVAL_BACKEND dygraph (with -amp for reduced precision)')
    return PredictorAsModel(model, config, 'bf16' if backend == 'inference_bf16' else 'fp32')


def datasets_of(config, world: World, task: Task) -> tuple:
    """(val set or None, train set or None under -eval), their lists checked once per machine."""
    with lists_checked_once_per_machine(world.local_rank, world.size > 1):
        val_set = task.build_val_set(config) if task.evaluates else None
        train_set = None if config.EVAL else task.build_train_set(config)
    return val_set, train_set


def steps_per_epoch(config, train_loader) -> int:
    """Optimizer steps of an epoch; DatasetError when the loader's batches make none."""
    steps = len(train_loader) // config.TRAIN.ACCUM_ITER
    if steps == 0:
        raise DatasetError(f'{len(train_loader)} batches per epoch are fewer than TRAIN.ACCUM_ITER '
                           f'{config.TRAIN.ACCUM_ITER}: no optimizer step would run')
    return steps


class Data(NamedTuple):
    """A split's data set and its loader."""

    set: object
    loader: object


def data_of(config, data_set, split: str, world: World, **kwargs) -> Data:
    """``data_set`` with its loader for ``split`` (datasets.get_dataloader's ``kwargs``)."""
    return Data(data_set, get_dataloader(config, data_set, split, world.size > 1, local_processes=world.local_size,
                                         **kwargs))


def build_trainer(config, model, *, world: World, amp: Amp, steps_per_epoch: int, objective: Objective,
                  task: Task) -> tuple[Trainer, dict]:
    """(the task's optimizer and schedule, scaler, EMA from the loaded weights and the objective around ``model``,
    the parameter settings table for param_groups.json)."""
    model_ema = ModelEma(model, config.TRAIN.MODEL_EMA_DECAY) if config.TRAIN.MODEL_EMA else None
    optimizer, lr_scheduler, settings = task.build_optimizer(config, model, steps_per_epoch, world.size)
    grad_scaler = LossScaler(
        enable=amp.enabled and amp.dtype == 'float16', init_loss_scaling=config.AMP_INIT_SCALE,
        incr_every_n_steps=config.AMP_INCR_EVERY_N_STEPS, decr_every_n_nan_or_inf=config.AMP_DECR_EVERY_N_NAN_OR_INF)
    if amp.o2:
        model, optimizer = decorate_o2(model, amp, optimizer)
    trainer = Trainer(model=paddle.DataParallel(model) if world.size > 1 else model, module=model,
                      optimizer=optimizer, lr_scheduler=lr_scheduler, grad_scaler=grad_scaler,
                      objective=objective, world=world, amp=amp,
                      model_ema=model_ema, accum_iter=config.TRAIN.ACCUM_ITER,
                      global_step=config.TRAIN.LAST_EPOCH * steps_per_epoch)
    return trainer, settings
