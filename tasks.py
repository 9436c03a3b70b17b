"""A task: everything that differs between kinds of training run, for job.py and engine.py, which run them all the
same way (checks before any output, output folder, logs, metrics.jsonl, checkpoints, resume, AMP, EMA, processes,
optimizer, LR schedule).

Each task lives in its own module (task_finetune.py, task_pretrain.py, task_linprobe.py), so that a run imports
only its own: a fine-tuning run never loads the pre-training tokenizer. plot_metrics.py finds every Task of the
task_*.py modules, so a new task's module is all it needs to get its curves drawn.
"""
from collections.abc import Callable
from dataclasses import dataclass

import paddle

from optim import build_training_optimizer


@dataclass(frozen=True)
class Curve:
    """A line that plot_metrics.py draws in curves.png: ``key`` of the metrics.jsonl records of ``split``, named
    ``label``; ``percent``: a fraction, drawn x100. (Loss curves, and the EMA's twin of a val curve, are drawn for
    every task: every objective reports ``loss``, and job.py records the EMA's evaluation as ``ema_<key>``.)"""

    split: str
    key: str
    label: str
    percent: bool = False


@dataclass(frozen=True)
class Task:
    """One kind of run; module-level functions only, so that spawn can pickle it.

    ``build_objective(config, world)`` gives the engine.Objective: loss, counts and metrics of a batch, in training
    and in evaluation. ``build_val_set`` is None for a task without evaluation; otherwise its split is evaluated
    every VALIDATE_FREQ epochs and is the only split of -eval. ``check_config`` raises config.ConfigError for what
    the task's configs must satisfy beyond config.validate_config.

    ``build_optimizer(config, model, steps_per_epoch, world_size)`` gives (optimizer, LR scheduler, the settings
    table written to param_groups.json); by default fine-tuning's AdamW with layer decay and warmup + cosine.
    ``split(model)`` gives (frozen part, trained part) for a model that is partly frozen: -pretrained then loads
    into the frozen part at every start, resumed ones included, and checkpoints hold the trained part only (and a
    digest of the frozen weights, which -resume must find again; such a task's check_config refuses -eval and
    TRAIN.MODEL_EMA, which act on the whole model); None: one part, the whole model. ``own_keys``
    holds (shared key, task key) pairs: the run uses the task's key for the shared one (a flag that sets the shared
    key sets the task's; naming the shared key in -opts is an error). ``curves``: what plot_metrics.py draws of
    its metrics besides the losses.
    """

    name: str
    build_model: Callable[..., paddle.nn.Layer]
    build_train_set: Callable
    build_val_set: Callable | None
    build_objective: Callable
    check_config: Callable
    build_optimizer: Callable = build_training_optimizer
    split: Callable | None = None
    own_keys: tuple[tuple[str, str], ...] = ()
    curves: tuple[Curve, ...] = ()

    @property
    def evaluates(self) -> bool:
        return self.build_val_set is not None

    def metrics_record(self, fields: dict) -> dict:
        """A metrics.jsonl line of this task: ``fields`` after the task's name, by which plot_metrics.py knows
        which curves to draw."""
        return {'task': self.name, **fields}
