"""The training and evaluation loops of every task, identical for one process and many.

Per optimizer step the processes exchange one small vector (the task's counts, e.g. loss sum, correct counts and
samples, plus the grad scaler's inf/nan flag), so every logged number is the global one and a non-finite loss stops
all processes at the same step. Reading that vector is the step's one host sync (a GPU waits for nothing else).
Evaluation sums the same counts over the whole val list (each sample seen once by one process): the exact accuracy.
"""
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn

from model_ema import ModelEma
from optim import float32_weights
from paddle_internals import found_inf
from utils import ProgressBar


class NonFiniteLossError(RuntimeError):
    """The loss became inf or nan without a grad scaler to skip the step: training cannot continue."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of the job."""

    rank: int = 0
    size: int = 1
    local_size: int = 1
    local_rank: int = 0  # among the processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Amp:
    """Mixed precision as it actually runs (off on CPU, where Paddle's AMP does nothing)."""

    enabled: bool = False
    level: str = 'O1'
    dtype: str = 'float16'

    @property
    def o2(self) -> bool:
        """Parameters in float16/bfloat16, float32 master weights in the optimizer."""
        return self.enabled and self.level == 'O2'

    @property
    def precision(self) -> str:
        """The dtype the model computes in: the AMP dtype, or float32."""
        return self.dtype if self.enabled else 'float32'

    def autocast(self):
        return paddle.amp.auto_cast(enable=self.enabled, level=self.level, dtype=self.dtype)

    def forward(self, model: nn.Layer, *inputs):
        """``model(*inputs)`` under autocast, its output (a tensor, or a list of them) in float32: losses and
        counts are computed in float32."""
        with self.autocast():
            outputs = model(*inputs)
        if isinstance(outputs, list):
            return [output.astype('float32') for output in outputs]
        return outputs.astype('float32')


class Objective(Protocol):
    """What a task trains for: one batch from the loader -> (loss to minimise, float64 counts of the batch), and
    for a task with a val split, ``evaluate_batch``: one val batch -> its counts (no gradient).

    Counts add up over micro-batches, batches and processes; ``summarise`` turns their totals into the metrics
    (``loss``, ``metric``, ``num_samples`` and any others). ``metric`` is the one training logs and the best
    checkpoint is chosen by (higher is better); ``logged`` the ones an evaluation logs and records for the EMA.
    ``reseed`` re-seeds its own randomness at each epoch. ``batch_draws`` (or None): what the train loader
    draws for each batch and appends to it (datasets.get_dataloader), so that the step draws nothing. An objective
    may also have ``describe(result) -> str``: text job.py logs after each evaluation's line (a per-class table)."""

    metric: str
    logged: tuple[str, ...]
    num_counts: int
    batch_draws: Callable[[int], tuple] | None

    def __call__(self, model: nn.Layer, batch, amp: Amp) -> tuple[paddle.Tensor, paddle.Tensor]: ...

    def evaluate_batch(self, model: nn.Layer, batch, amp: Amp) -> paddle.Tensor: ...

    def summarise(self, totals: np.ndarray) -> dict: ...

    def reseed(self, seed: int) -> None: ...


@dataclass
class Trainer:
    """What a training step needs. ``model`` is what runs forward (paddle.DataParallel with several processes),
    ``module`` the bare model inside it (a BEiT, or a LinearProbe: its state dict, its EMA)."""

    model: nn.Layer
    module: nn.Layer
    optimizer: paddle.optimizer.Optimizer
    lr_scheduler: paddle.optimizer.lr.LRScheduler
    grad_scaler: paddle.amp.GradScaler
    objective: Objective
    world: World
    amp: Amp = field(default_factory=Amp)
    model_ema: ModelEma | None = None
    accum_iter: int = 1
    global_step: int = 0


def all_reduce_sum(values: paddle.Tensor, world: World) -> np.ndarray:
    """The element-wise sum over all processes, as float64 numpy."""
    if world.size > 1:
        dist.all_reduce(values)
    return values.numpy().astype(np.float64)


BATCH_NORM_STATISTICS = ('_mean', '_variance')  # a Paddle BatchNorm's running statistics, as its state dict names them
UNSYNCED_BATCH_NORMS = (nn.BatchNorm1D, nn.BatchNorm2D, nn.BatchNorm3D)  # not nn.SyncBatchNorm, a sibling class


def average_batch_norm_statistics(model: nn.Layer, world: World) -> int:
    """Set every process's BatchNorm running statistics to their mean over the processes, in place; returns how many
    layers. Where BatchNorm is not synchronised (several CPU processes: Paddle has no CPU SyncBatchNorm kernel) each
    process's statistics follow its own batches, yet only the main process's are saved while every process
    evaluates its share with its own: without this, a run's evaluations would not be its checkpoints', and a resumed
    process (given the main one's) would evaluate otherwise. Averaged once an epoch, the statistics are the same
    everywhere, in the checkpoint too. SyncBatchNorm layers (their statistics are already the same) are left alone.
    The mean of the means is the whole batch's; the mean of the variances leaves out the spread between processes."""
    layers = [layer for layer in model.sublayers(include_self=True) if isinstance(layer, UNSYNCED_BATCH_NORMS)]
    if world.size > 1:
        for layer in layers:
            for name, statistic in layer.state_dict(include_sublayers=False).items():
                if name in BATCH_NORM_STATISTICS:
                    total = statistic.clone()
                    dist.all_reduce(total)
                    statistic.set_value(total / world.size)
    return len(layers)


def _forward_backward(trainer: Trainer, batch, sync: bool) -> paddle.Tensor:
    """Add one micro-batch's gradients (scaled by 1/ACCUM_ITER); returns its counts."""
    defer_sync = trainer.world.size > 1 and not sync
    with trainer.model.no_sync() if defer_sync else contextlib.nullcontext():
        loss, counts = trainer.objective(trainer.model, batch, trainer.amp)
        trainer.grad_scaler.scale(loss / trainer.accum_iter).backward()
    return counts


def _unscale_and_check(trainer: Trainer) -> paddle.Tensor:
    """Unscale the accumulated gradients; float64 [1]: 1 when the grad scaler found inf/nan among them (it then
    skips the step), 0 without a grad scaler. A device tensor: it joins the step's one all-reduce."""
    if not trainer.grad_scaler.is_enable():
        return paddle.zeros([1], dtype='float64')
    trainer.grad_scaler.unscale_(trainer.optimizer)
    return found_inf(trainer.grad_scaler).astype('float64').reshape([1])


def _optimizer_step(trainer: Trainer, applied: bool) -> None:
    """Apply the unscaled, accumulated gradients (clipped by the optimizer) unless the grad scaler found inf/nan
    (``applied`` False: it skips the step itself). The LR schedule advances either way."""
    trainer.grad_scaler.step(trainer.optimizer)
    trainer.grad_scaler.update()
    trainer.optimizer.clear_grad(set_to_zero=False)
    trainer.lr_scheduler.step()
    if applied and trainer.model_ema is not None:
        trainer.model_ema.update(float32_weights(trainer.module, trainer.optimizer, o2=trainer.amp.o2))
    trainer.global_step += 1


def _stop_on_non_finite(loss: float, trainer: Trainer, where: str) -> None:
    if not math.isfinite(loss) and not trainer.grad_scaler.is_enable():
        raise NonFiniteLossError(f'the training loss is {loss} at {where}; stopped before this optimizer step, '
                                 'so no weights were changed by it (try a lower TRAIN.BASE_LR or TRAIN.GRAD_CLIP)')


def train_one_epoch(trainer: Trainer, loader, epoch: int, num_epochs: int, steps: int, report_freq: int,
                    logger: logging.Logger) -> dict:
    """``steps`` optimizer steps of ACCUM_ITER micro-batches each; micro-batches left over at the end of the
    loader are read but not used. Returns the epoch's global averages, throughput and skipped-step count."""
    trainer.model.train()
    objective, k = trainer.objective, trainer.accum_iter
    epoch_totals = np.zeros(objective.num_counts)
    group = paddle.zeros([objective.num_counts], dtype='float64')
    skipped, lr = 0, trainer.optimizer.get_lr()
    progress = ProgressBar(steps, f'epoch {epoch}', trainer.world.is_main)
    start = time.time()
    for micro, batch in enumerate(loader):
        if micro >= steps * k:
            continue
        group += _forward_backward(trainer, batch, sync=(micro + 1) % k == 0)
        if (micro + 1) % k:
            continue
        step = (micro + 1) // k
        reduced = all_reduce_sum(paddle.concat([group, _unscale_and_check(trainer)]), trainer.world)
        totals, found_inf = reduced[:-1], bool(reduced[-1])
        group = paddle.zeros([objective.num_counts], dtype='float64')
        lr = trainer.optimizer.get_lr()
        current = objective.summarise(totals)
        _stop_on_non_finite(current['loss'], trainer, f'epoch {epoch} step {step} (global step '
                                                      f'{trainer.global_step + 1})')
        _optimizer_step(trainer, applied=not found_inf)
        skipped += found_inf
        epoch_totals += totals
        progress.show(step)
        if step % report_freq == 0 or step == steps:
            progress.clear()
            average = objective.summarise(epoch_totals)
            metric = objective.metric
            logger.info(f'epoch {epoch}/{num_epochs} step {step}/{steps} lr {lr:.6e} '
                        f'loss {current["loss"]:.4f} (avg {average["loss"]:.4f}) '
                        f'{metric} {current[metric]:.4f} (avg {average[metric]:.4f}) '
                        f'skipped {skipped}')
    progress.clear()
    elapsed = time.time() - start
    result = objective.summarise(epoch_totals)
    result.update(lr=lr, time=elapsed, images_per_sec=result['num_samples'] / max(elapsed, 1e-9),
                  skipped_steps=skipped)
    return result


@paddle.no_grad()
def evaluate(model: nn.Layer, loader, world: World, amp: Amp, objective: Objective) -> dict:
    """The objective's metrics over every sample of ``loader`` on all processes, with the sample count and the
    throughput. ``model`` is the plain model (no DataParallel: evaluation needs no gradient sync)."""
    model.eval()
    totals = paddle.zeros([objective.num_counts], dtype='float64')
    progress = ProgressBar(len(loader), 'eval', world.is_main)
    start = time.time()
    for done, batch in enumerate(loader, start=1):
        totals += objective.evaluate_batch(model, batch, amp)
        progress.show(done)
    progress.clear()
    result = objective.summarise(all_reduce_sum(totals, world))
    elapsed = time.time() - start
    result.update(time=elapsed, images_per_sec=result['num_samples'] / max(elapsed, 1e-9))
    return result
