"""One process's share of a training or evaluation run, the code path of every entry point and every task (a
tasks.Task holds what differs: model, data, objective, evaluation).

``prepare`` checks every input and builds everything in memory (run_setup.py: data, model, trainer;
starting_point.py: weights, resumed state) before the output folder is touched, so bad input ends the run with a
clear error and nothing written. ``train`` then runs epoch by epoch: seeded from (SEED, epoch, rank), trained,
recorded, validated, checkpointed; run_folder.RunFolder owns everything written. cli.py runs it from the command
line: in one process, or one per device.
"""
import logging
from dataclasses import dataclass

import paddle
from paddle.utils import unique_name

import cpu_runtime
import gpu_runtime
import run_folder
from checkpoint import check_pretrained_path, save_checkpoint
from config import ConfigError
from engine import (
    Amp,
    NonFiniteLossError,
    Objective,
    Trainer,
    World,
    all_reduce_sum,
    average_batch_norm_statistics,
    evaluate,
    train_one_epoch,
)
from run_folder import PARAM_GROUPS_FILE, RunFolder
from run_setup import (
    Data,
    amp_for,
    build_model,
    build_trainer,
    data_of,
    datasets_of,
    decorate_o2,
    evaluation_model,
    fused_attention_note,
    init_world,
    steps_per_epoch,
)
from starting_point import load_starting_weights, restore_training_state, start_from
from tasks import Task
from utils import derived_seed, seed_everything, start_logger, use_all_cpu_cores


@dataclass(kw_only=True)
class Job:
    """A checked run, built in memory: ``model`` is the bare model (for -eval with EVAL_BACKEND inference*, its
    Paddle Inference copy), ``objective`` the task's; ``val`` is None for a task without evaluation (pre-training),
    ``train`` and ``trainer`` (what the optimizer steps need) None under -eval. Checkpoints hold ``saved_part``: the
    model, or the trained part of a partly frozen one."""

    config: object
    task: Task
    world: World
    logger: logging.Logger
    amp: Amp
    model: object
    objective: Objective
    folder: RunFolder
    start_epoch: int  # epochs already finished (training), or the evaluated checkpoint's
    val: Data | None = None
    train: Data | None = None
    trainer: Trainer | None = None
    saved_part: object = None
    param_settings: dict | None = None
    steps_per_epoch: int = 0


def check_run_config(config, task: Task) -> None:
    """What the config alone makes impossible for ``task``: raises an errors.BadInputError."""
    if config.EVAL and config.MODEL.RESUME:
        raise ConfigError('-eval evaluates the -pretrained weights (a training checkpoint works there); '
                          '-resume continues training')
    task.check_config(config)
    if config.EVAL and not config.MODEL.PRETRAINED:
        raise ConfigError('-eval needs -pretrained WEIGHTS (converted weights or a training checkpoint): '
                          'it never evaluates a randomly initialised model')


def check_before_launch(config, task: Task) -> None:
    """What ``prepare`` checks without building the model: the config, the output folder, the list files (read
    once per machine: the processes then reuse them) and that the weight files exist. The launching process runs
    it before it starts any; the processes check the rest (the files' contents) before they write anything."""
    check_run_config(config, task)
    datasets_of(config, World(), task)
    resuming = config.MODEL.RESUME and not config.EVAL
    if resuming:
        run_folder.resolve_resume_path(config.MODEL.RESUME)
    if config.MODEL.PRETRAINED and (not resuming or task.split is not None):
        check_pretrained_path(config.MODEL.PRETRAINED)
    run_folder.check_free(config.SAVE)  # the rest of RunFolder.check comes after the weights, in prepare
    run_folder.check_is_folder(config.SAVE)


def prepare(config, world: World, logger: logging.Logger, task: Task) -> Job:
    """Check every input and build the run in memory; raises an errors.BadInputError, having written nothing."""
    check_run_config(config, task)
    amp = amp_for(config, logger)
    val_set, train_set = datasets_of(config, world, task)
    val = data_of(config, val_set, 'val', world) if task.evaluates else None
    seed_everything(config.SEED)
    gpu_runtime.set_deterministic(config.DETERMINISTIC, logger)
    model = build_model(config, task, amp)
    note = fused_attention_note(config, model)
    if note:
        logger.info(note)
    objective = task.build_objective(config, world)
    parts = dict(config=config, task=task, world=world, logger=logger, amp=amp, objective=objective, val=val)
    if config.EVAL:
        return _prepare_evaluation(model, **parts)
    return _prepare_training(model, train=data_of(config, train_set, 'train', world,
                                                             batch_draws=objective.batch_draws), **parts)


def _prepare_evaluation(model, *, config, world: World, logger: logging.Logger, amp: Amp, **parts) -> Job:
    epoch = load_starting_weights(config, model, logger)
    if amp.o2:
        model = decorate_o2(model, amp)
    folder = RunFolder(config.SAVE, writes=world.is_main, training=False)
    folder.check()
    return Job(config=config, world=world, logger=logger, amp=amp, model=evaluation_model(config, model),
               folder=folder, start_epoch=config.TRAIN.LAST_EPOCH if epoch is None else epoch, **parts)


def _prepare_training(model, *, config, task: Task, world: World, logger: logging.Logger, amp: Amp,
                      objective: Objective, train: Data, **parts) -> Job:
    steps = steps_per_epoch(config, train.loader)
    start = start_from(config, model, task, logger)
    start_epoch = start.checkpoint['epoch'] if start.checkpoint is not None else config.TRAIN.LAST_EPOCH
    if start_epoch >= config.TRAIN.NUM_EPOCHS:
        raise ConfigError(f'{start_epoch} epochs are already done and TRAIN.NUM_EPOCHS is '
                          f'{config.TRAIN.NUM_EPOCHS}: nothing to train')
    where = dict(writes=world.is_main, keep_checkpoints=config.KEEP_CHECKPOINTS, frozen_weights=start.frozen_weights)
    folder = (RunFolder.resumed(config.SAVE, start.checkpoint, start.path, **where) if start.checkpoint is not None
              else RunFolder(config.SAVE, start_epoch=start_epoch, **where))
    folder.check()
    trainer, settings = build_trainer(config, model, world=world, amp=amp, steps_per_epoch=steps,
                                      objective=objective, task=task)
    if start.checkpoint is not None:
        restore_training_state(trainer, start.checkpoint, logger)
    return Job(config=config, task=task, world=world, logger=logger, amp=amp, model=model, objective=objective,
               folder=folder, start_epoch=start_epoch, train=train, trainer=trainer, saved_part=start.saved_part,
               param_settings=settings, steps_per_epoch=steps, **parts)


def open_output(job: Job) -> None:
    """Open the run folder (RunFolder.open): from now on the main process writes log.txt and metrics.jsonl."""
    job.folder.open(job.logger)
    if job.param_settings is not None:
        job.folder.write_json(PARAM_GROUPS_FILE, job.param_settings)


def _record(job: Job, record: dict) -> None:
    """A line of metrics.jsonl, named by the task (plot_metrics.py draws the curves the task declares)."""
    job.folder.record(job.task.metrics_record(record))


def _bad_images(job: Job, dataset) -> int:
    """Undecodable images replaced so far (DATA.BAD_IMAGE_POLICY 'skip'), summed over the processes."""
    count = int(all_reduce_sum(paddle.to_tensor([float(dataset.bad_images)], dtype='float64'), job.world)[0])
    if count:
        job.logger.warning(f'{count} undecodable images were replaced by other samples '
                           f'(DATA.BAD_IMAGE_POLICY skip; the dataset logged their paths)')
    return count


def _evaluate_and_log(job: Job, model, label: str) -> dict:
    result = evaluate(model, job.val.loader, job.world, job.amp, job.objective)
    metrics = ' '.join(f'{key} {result[key]}' if isinstance(result[key], int) else f'{key} {result[key]:.4f}'
                       for key in job.objective.logged)
    job.logger.info(f'{label}: {metrics} on {result["num_samples"]} images ({result["images_per_sec"]:.1f} images/s)')
    describe = getattr(job.objective, 'describe', None)  # more than one line's worth (segmentation's classes)
    if describe is not None:
        job.logger.info(describe(result))
    return result


def _metric_fields(result: dict) -> dict:
    """What metrics.jsonl records of a result: its metrics, sample count and throughput (not the seconds)."""
    return {key: value for key, value in result.items() if key != 'time'}


def _validate(job: Job, epoch: int, lr: float) -> dict:
    trainer = job.trainer
    result = _evaluate_and_log(job, trainer.module, f'epoch {epoch} val')
    record = {'split': 'val', 'epoch': epoch, **_metric_fields(result), 'lr': lr,
              'bad_images': _bad_images(job, job.val.set)}
    if trainer.model_ema is not None:
        ema = _evaluate_and_log(job, trainer.model_ema.module, f'epoch {epoch} val EMA')
        record.update({f'ema_{key}': ema[key] for key in job.objective.logged})
    _record(job, record)
    return record


def _track_best(job: Job, epoch: int, record: dict) -> bool:
    """Whether this evaluation is the best so far by the objective's metric, of the EMA weights when there is an
    EMA (timm's rule)."""
    metric = job.objective.metric
    weights = 'EMA' if f'ema_{metric}' in record else 'model'
    value = record[f'ema_{metric}' if weights == 'EMA' else metric]
    improved = job.folder.update_best(epoch, metric=metric, value=value, weights=weights)
    best = job.folder.best
    job.logger.info(f'best val {metric} so far {best[metric]:.4f} (epoch {best["epoch"]}, {best["weights"]} weights)')
    return improved


def _checkpoint_writer(job: Job, epoch: int):
    """write(path, records) of RunFolder: the run's whole training state after ``epoch``."""
    trainer = job.trainer

    def write(path: str, records: dict) -> None:
        save_checkpoint(path, model=job.saved_part, optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler,
                        grad_scaler=trainer.grad_scaler, model_ema=trainer.model_ema, epoch=epoch,
                        global_step=trainer.global_step, config=job.config, o2=job.amp.o2, **records)
    return write


def _save(job: Job, epoch: int, *, improved: bool) -> None:
    """The epoch's checkpoint when SAVE_FREQ says so, then the best file when the epoch is the best so far."""
    config, folder, write = job.config, job.folder, _checkpoint_writer(job, epoch)
    if _due(epoch, config.SAVE_FREQ, config.TRAIN.NUM_EPOCHS):
        job.logger.info(f'saved {folder.save_epoch(epoch, write)}')
    if improved:
        path = folder.save_best(epoch, write)
        job.logger.info(f'saved {path} (epoch {epoch}, by the val {job.objective.metric} of the '
                        f'{folder.best["weights"]} weights)')


def _due(epoch: int, every: int, last: int) -> bool:
    return epoch % every == 0 or epoch == last


def _start_epoch(job: Job, epoch: int) -> None:
    """Data order, augmentations, mixup and drop path of an epoch depend on (SEED, epoch, rank) only, so a run
    resumed from an epoch's checkpoint repeats exactly what an uninterrupted run does."""
    seed = derived_seed(job.config.SEED, epoch, job.world.rank)
    seed_everything(seed)
    job.trainer.objective.reseed(seed)
    job.train.set.reseed(seed)
    job.train.loader.batch_sampler.set_epoch(epoch)


def _train_epoch(job: Job, epoch: int) -> dict:
    config = job.config
    try:
        result = train_one_epoch(job.trainer, job.train.loader, epoch, config.TRAIN.NUM_EPOCHS, job.steps_per_epoch,
                                 config.REPORT_FREQ, job.logger)
    except NonFiniteLossError as err:
        kept = job.folder.last_checkpoint or 'none was saved yet'
        raise NonFiniteLossError(f'{err}. The last good checkpoint: {kept}') from None
    for model in (job.trainer.model, job.trainer.model_ema and job.trainer.model_ema.module):
        if model is not None:  # before they are evaluated and saved
            average_batch_norm_statistics(model, job.world)
    metric = job.objective.metric
    job.logger.info(f'epoch {epoch} train: loss {result["loss"]:.4f} {metric} {result[metric]:.4f} '
                    f'time {result["time"]:.1f}s ({result["images_per_sec"]:.1f} images/s), '
                    f'{result["skipped_steps"]} steps skipped for inf/nan gradients')
    _record(job, {'split': 'train', 'epoch': epoch, **_metric_fields(result),
                       'bad_images': _bad_images(job, job.train.set)})
    return result


def train(job: Job) -> None:
    config = job.config
    num_epochs = config.TRAIN.NUM_EPOCHS
    job.logger.info(f'training epochs {job.start_epoch + 1}..{num_epochs}: {job.steps_per_epoch} optimizer steps of '
                    f'{config.TRAIN.ACCUM_ITER} x {config.DATA.BATCH_SIZE} images x {job.world.size} processes')
    for epoch in range(job.start_epoch + 1, num_epochs + 1):
        _start_epoch(job, epoch)
        result = _train_epoch(job, epoch)
        improved = False
        if job.val is not None and _due(epoch, config.VALIDATE_FREQ, num_epochs):
            improved = _track_best(job, epoch, _validate(job, epoch, result['lr']))
        _save(job, epoch, improved=improved)


def evaluate_weights(job: Job) -> dict:
    if job.config.EVAL_BACKEND != 'dygraph':
        job.logger.info(f'evaluating the exported model in Paddle Inference ({job.config.EVAL_BACKEND})')
    result = _evaluate_and_log(job, job.model, 'val')
    record = {'split': 'val', 'epoch': job.start_epoch, **_metric_fields(result), 'lr': None,
              'bad_images': _bad_images(job, job.val.set), 'weights': job.config.MODEL.PRETRAINED}
    _record(job, record)
    return record


def execute(config, multi_process: bool, task: Task) -> None:
    """Run this process's part of ``task``: evaluate (-eval) or train; raises an errors.BadInputError for bad input,
    having written nothing, or NonFiniteLossError when training diverges."""
    world = init_world(multi_process)
    logger = start_logger(world.is_main)
    threads = use_all_cpu_cores(world.local_size) if paddle.get_device().startswith('cpu') else None
    with unique_name.guard():  # the same parameter names on every run: optimizer state is saved by them
        job = prepare(config, world, logger, task)
        open_output(job)
        logger.info(f'{task.name}: {world.size} process(es), device {paddle.get_device()}'
                    + (f', {threads} CPU threads each' if threads else '') + f'\n{cpu_runtime.describe()}'
                    + '\nconfig:\n' + config.dump())
        if config.EVAL:
            evaluate_weights(job)
        else:
            train(job)
