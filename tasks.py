"""A task: everything that differs between kinds of training run, for job.py and engine.py, which run them all the
same way (checks before any output, output folder, logs, metrics.jsonl, checkpoints, resume, AMP, EMA, processes,
optimizer, LR schedule).

Each task lives in its own module (task_finetune.py, task_pretrain.py, task_linprobe.py), so that a run imports
only its own: a fine-tuning run never loads the pre-training tokenizer.
"""
from collections.abc import Callable
from dataclasses import dataclass

import paddle

from optim import build_training_optimizer


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
    key sets the task's; naming the shared key in -opts is an error).
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

    @property
    def evaluates(self) -> bool:
        return self.build_val_set is not None
