"""A task: everything that differs between kinds of training run, for job.py and engine.py, which run them all the
same way (checks before any output, output folder, logs, metrics.jsonl, checkpoints, resume, AMP, EMA, processes,
optimizer, LR schedule).

Each task lives in its own module (task_finetune.py, task_pretrain.py), so that a run imports only its own: a
fine-tuning run never loads the pre-training tokenizer.
"""
from collections.abc import Callable
from dataclasses import dataclass

import paddle


@dataclass(frozen=True)
class Task:
    """One kind of run; module-level functions only, so that spawn can pickle it.

    ``build_objective(config, world)`` gives the engine.Objective: loss, counts and metrics of a batch, in training
    and in evaluation. ``build_val_set`` is None for a task without evaluation; otherwise its split is evaluated
    every VALIDATE_FREQ epochs and is the only split of -eval. ``check_config`` raises config.ConfigError for what
    the task's configs must satisfy beyond config.validate_config.
    """

    name: str
    build_model: Callable[..., paddle.nn.Layer]
    build_train_set: Callable
    build_val_set: Callable | None
    build_objective: Callable
    check_config: Callable

    @property
    def evaluates(self) -> bool:
        return self.build_val_set is not None
