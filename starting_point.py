"""Where a run starts from: the -pretrained weights, or the -resume checkpoint with the training state it holds
(optimizer, schedule, scaler, EMA, steps) and the settings it was trained with."""
import logging
from typing import NamedTuple

from checkpoint import CheckpointError, check_exact_fit, load_pretrained, load_training_checkpoint, weights_digest
from config import ConfigError, changed_settings
from engine import Trainer
from run_folder import resolve_resume_path
from tasks import Task


class Start(NamedTuple):
    """A training run's start: the resumed ``checkpoint`` (None for a new run) read from ``path``, the part of the
    model checkpoints hold (``saved_part``) and the record of the frozen rest (None: nothing is frozen)."""

    checkpoint: dict | None
    path: str
    saved_part: object
    frozen_weights: dict | None


def load_starting_weights(config, model, logger: logging.Logger) -> int | None:
    """Load -pretrained into ``model``; returns the epoch when the file is a training checkpoint."""
    if not config.MODEL.PRETRAINED:
        logger.info('no -pretrained weights: the model keeps its random initialisation')
        return None
    notes, epoch = load_pretrained(model, config.MODEL.PRETRAINED, config.MODEL.PRETRAINED_EMA,
                                   config.MODEL.REL_POS_INTERP, complete=config.EVAL, trust_pickle=config.TRUST_PICKLE)
    which = 'EMA weights' if config.MODEL.PRETRAINED_EMA else 'weights'
    logger.info(f'loaded {which} from {config.MODEL.PRETRAINED}' + ''.join(f'\n  note: {note}' for note in notes))
    return epoch


def _report_changed_settings(checkpoint: dict, config, path: str, logger: logging.Logger) -> None:
    """A resume may change the recipe (it is logged, key by key), never what the saved tensors were built for."""
    changes, fixed = changed_settings(checkpoint.get('config') or '', config)
    if fixed:
        raise ConfigError(f'-resume: {path} was saved for another architecture than this run ('
                          + ', '.join(f'{key} {old} there, {new} here' for key, old, new in fixed)
                          + f'): a resume cannot change the model (to start from its weights: -pretrained {path})')
    if changes:
        logger.info('resumed with other settings than the checkpoint\'s (key: checkpoint -> this run):'
                    + ''.join(f'\n  {key}: {old} -> {new}' for key, old, new in changes))


def _resumed_checkpoint(config, model, logger: logging.Logger, whole: bool) -> tuple[dict | None, str]:
    """(checkpoint, path) of -resume with its weights loaded into ``model`` (the ``whole`` model, or the trained
    part of a partly frozen one); (None, '') without -resume."""
    if not config.MODEL.RESUME:
        return None, ''
    path = resolve_resume_path(config.MODEL.RESUME)
    checkpoint = load_training_checkpoint(path, trust_pickle=config.TRUST_PICKLE)
    _report_changed_settings(checkpoint, config, path, logger)
    check_exact_fit(checkpoint['model'], model, path)
    model.set_state_dict(checkpoint['model'])
    if config.MODEL.PRETRAINED and whole:
        logger.info(f'-resume given: -pretrained {config.MODEL.PRETRAINED} is not used')
    logger.info(f'resumed from {path}: {checkpoint["epoch"]} epochs, {checkpoint["global_step"]} steps done')
    return checkpoint, path


def _check_same_frozen_weights(checkpoint: dict, frozen_weights: dict, path: str) -> None:
    """A partly frozen model's checkpoint trained its part on particular frozen weights: resuming it on others
    would continue on other features."""
    saved = checkpoint.get('frozen_weights') or {}
    if saved.get('digest') != frozen_weights['digest']:
        source = saved.get('pretrained') or 'none: the seeded random initialisation'
        raise CheckpointError(f'-resume: {path} was trained on other frozen weights than this run loaded '
                              f'(-pretrained {frozen_weights["pretrained"] or "none"}); resume with the -pretrained '
                              f'of that run ({source})')


def start_from(config, model, task: Task, logger: logging.Logger) -> Start:
    """A training run's start: -resume loaded into the trained part, -pretrained into the frozen one (the whole
    model unless resumed)."""
    frozen, trained = task.split(model) if task.split is not None else (model, model)
    checkpoint, path = _resumed_checkpoint(config, trained, logger, whole=trained is model)
    if checkpoint is None or trained is not model:
        load_starting_weights(config, frozen, logger)
    if trained is model:
        return Start(checkpoint, path, model, None)
    record = {'pretrained': config.MODEL.PRETRAINED, 'digest': weights_digest(frozen)}
    if checkpoint is not None:
        _check_same_frozen_weights(checkpoint, record, path)
    return Start(checkpoint, path, trained, record)


def _optimizer_state_for(trainer: Trainer, checkpoint: dict, logger: logging.Logger) -> dict:
    """The checkpoint's optimizer state, without the master weights of an O2 run when this run is not O2: Paddle
    would install them and keep saving them, never updated (the resumed model holds their values already)."""
    state = checkpoint['optimizer']
    if trainer.amp.o2 or 'master_weights' not in state:
        return state
    logger.info('the checkpoint was saved under AMP O2 and this run is not O2: its optimizer\'s float32 master '
                'weights are dropped (the resumed model holds them)')
    return {key: value for key, value in state.items() if key != 'master_weights'}


def restore_training_state(trainer: Trainer, checkpoint: dict, logger: logging.Logger) -> None:
    """Continue ``checkpoint``'s optimizer, schedule, scaler, EMA and step count."""
    trainer.optimizer.set_state_dict(_optimizer_state_for(trainer, checkpoint, logger))
    trainer.lr_scheduler.set_state_dict(checkpoint['lr_scheduler'])
    if trainer.grad_scaler.is_enable() and checkpoint.get('grad_scaler'):
        trainer.grad_scaler.load_state_dict(checkpoint['grad_scaler'])
    if trainer.model_ema is not None:
        if checkpoint.get('model_ema'):
            trainer.model_ema.set_state_dict(checkpoint['model_ema'])
        else:
            logger.info('the checkpoint has no EMA: the EMA starts from the resumed weights')
    trainer.global_step = checkpoint['global_step']
