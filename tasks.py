"""What differs between fine-tuning and pre-training, for job.py and engine.py, which run both the same way.

A task builds the model, its training set and its objective (engine.Objective: loss and logged counts of a batch),
and says whether it has a validation split and what its configs must satisfy. Everything else (checks before any
output, output folder, logs, metrics.jsonl, checkpoints, resume, AMP, EMA, processes, optimizer, LR schedule) is
shared.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import paddle

from beit import build_beit
from beit_pretrain import MaskedImageModelingObjective, build_beit_pretrain, build_tokenizer_for
from config import validate_pretraining_config
from datasets import get_dataset, get_pretraining_dataset
from engine import ClassificationObjective, World
from losses import build_criterion
from mixup import build_mixup


def _classification_objective(config, world: World) -> ClassificationObjective:
    """Cross entropy with Mixup/CutMix and label smoothing as configured; Mixup draws from (SEED, rank)."""
    mixup = build_mixup(config, rng=np.random.default_rng(config.SEED + world.rank))
    return ClassificationObjective(build_criterion(config, mixup is not None), mixup)


def _masked_image_modeling_objective(config, world: World) -> MaskedImageModelingObjective:
    return MaskedImageModelingObjective(build_tokenizer_for(config))


def _no_extra_checks(config) -> None:
    """Fine-tuning configs need nothing beyond config.validate_config."""


@dataclass(frozen=True)
class Task:
    """One kind of training run; module-level functions only, so that spawn can pickle it."""

    name: str
    build_model: Callable[..., paddle.nn.Layer]
    build_train_set: Callable
    build_objective: Callable
    check_config: Callable
    evaluates: bool  # a val split: evaluated every VALIDATE_FREQ epochs, and the only split of -eval


FINE_TUNING = Task('fine-tuning', build_beit, partial(get_dataset, mode='train'), _classification_objective,
                   _no_extra_checks, evaluates=True)
PRETRAINING = Task('masked image modeling pre-training', build_beit_pretrain, get_pretraining_dataset,
                   _masked_image_modeling_objective, validate_pretraining_config, evaluates=False)
