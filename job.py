"""One process's share of a training or evaluation run, the code path of every entry point and every task (a
tasks.Task holds what differs: model, data, objective, evaluation).

``prepare`` checks every input and builds everything in memory (data, model, weights, optimizer, resumed state)
before the output folder is touched, so bad input ends the run with a clear error and nothing written.
``train`` then runs epoch by epoch: seeded from (SEED, epoch, rank), logged, evaluated, checkpointed.
cli.py runs it from the command line: in one process, or one per device.
"""
import logging
import os
from dataclasses import dataclass, field

import paddle
import paddle.distributed as dist
from paddle.utils import unique_name

import cpu_ops
import cpu_runtime
import gpu_runtime
import run_folder
from checkpoint import (
    BEST_CHECKPOINT,
    CheckpointError,
    check_exact_fit,
    check_pretrained_path,
    checkpoint_path,
    checkpoints_in,
    checkpoints_written_before,
    keep_newest,
    load_pretrained,
    load_training_checkpoint,
    resolve_resume_path,
    save_checkpoint,
    weights_digest,
)
from config import ConfigError
from datasets import get_dataloader
from engine import Amp, NonFiniteLossError, Objective, Trainer, World, all_reduce_sum, evaluate, train_one_epoch
from inference import PredictorAsModel
from model_ema import ModelEma
from sample_sources import DatasetError
from sample_table import lists_checked_once_per_machine
from tasks import Task
from utils import (
    append_jsonl,
    attach_log_file,
    derived_seed,
    publish_copy,
    seed_everything,
    start_logger,
    use_all_cpu_cores,
    write_json,
)

FLOAT32 = Amp()  # AMP off


@dataclass
class Job:
    """A checked run, built in memory: ``model`` is the bare model (for -eval with EVAL_BACKEND inference*, its
    Paddle Inference copy), ``objective`` the task's, ``trainer`` (training only) holds what the optimizer steps
    need; ``last_checkpoint`` is the newest checkpoint this run can fall back on. A task without evaluation
    (pre-training) has no val set. ``saved_part`` is what checkpoints hold (the model, or a partly frozen model's
    trained part, whose frozen part ``frozen_weights`` describes: {pretrained, digest})."""

    config: object
    world: World
    logger: logging.Logger
    amp: Amp
    model: object
    objective: Objective
    val_set: object = None
    val_loader: object = None
    train_set: object = None
    train_loader: object = None
    trainer: Trainer | None = None
    param_settings: dict | None = None
    start_epoch: int = 0  # epochs already finished (training), or the evaluated checkpoint's
    steps_per_epoch: int = 0
    last_checkpoint: str = ''
    best: dict | None = None  # {<metric>, epoch, weights} of the best validation so far, carried over by -resume
    written: list = field(default_factory=list)  # epoch checkpoints this run wrote, oldest first
    lock: object = None  # the main process's hold on the output folder (run_folder.lock)
    saved_part: object = None
    frozen_weights: dict | None = None


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


def _load_starting_weights(config, model, logger: logging.Logger) -> int | None:
    """Load -pretrained into ``model``; returns the epoch when the file is a training checkpoint."""
    if not config.MODEL.PRETRAINED:
        logger.info('no -pretrained weights: the model keeps its random initialisation')
        return None
    notes, epoch = load_pretrained(model, config.MODEL.PRETRAINED, config.MODEL.PRETRAINED_EMA,
                                   config.MODEL.REL_POS_INTERP, complete=config.EVAL, trust_pickle=config.TRUST_PICKLE)
    which = 'EMA weights' if config.MODEL.PRETRAINED_EMA else 'weights'
    logger.info(f'loaded {which} from {config.MODEL.PRETRAINED}' + ''.join(f'\n  note: {note}' for note in notes))
    return epoch


def _resumed_checkpoint(config, model, logger: logging.Logger, whole: bool) -> tuple[dict | None, str]:
    """(checkpoint, path) of -resume with its weights loaded into ``model`` (the ``whole`` model, or the trained
    part of a partly frozen one); (None, '') without -resume."""
    if not config.MODEL.RESUME:
        return None, ''
    path = resolve_resume_path(config.MODEL.RESUME)
    checkpoint = load_training_checkpoint(path, trust_pickle=config.TRUST_PICKLE)
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


def _start_from(config, model, task: Task, logger: logging.Logger) -> tuple[dict | None, str, object, dict | None]:
    """(checkpoint or None, its path, the part checkpoints hold, the frozen part's record or None) of a training
    run: -resume loaded into the trained part, -pretrained into the frozen one (the whole model unless resumed)."""
    frozen, trained = task.split(model) if task.split is not None else (model, model)
    checkpoint, path = _resumed_checkpoint(config, trained, logger, whole=trained is model)
    if checkpoint is None or trained is not model:
        _load_starting_weights(config, frozen, logger)
    if trained is model:
        return checkpoint, path, model, None
    record = {'pretrained': config.MODEL.PRETRAINED, 'digest': weights_digest(frozen)}
    if checkpoint is not None:
        _check_same_frozen_weights(checkpoint, record, path)
    return checkpoint, path, trained, record


def _refuse_to_overwrite(output_dir: str, first_epoch: int, last_epoch: int, resuming: bool) -> None:
    """Checkpoints are never overwritten: a folder already holding the ones this run would write is refused, and
    so is another run's best checkpoint unless this run continues that one."""
    taken = sorted(epoch for epoch in checkpoints_in(output_dir) if first_epoch <= epoch <= last_epoch)
    if taken:
        raise CheckpointError(f'{output_dir} already holds checkpoint-epoch-{taken[0]}.pdparams, which this run '
                              'would overwrite: choose another -output, or -resume from its latest checkpoint')
    if not resuming and os.path.exists(os.path.join(output_dir, BEST_CHECKPOINT)):
        raise CheckpointError(f'{output_dir} already holds another run\'s {BEST_CHECKPOINT}, which this run would '
                              'replace: choose another -output, or -resume from its latest checkpoint')


def _optimizer_state_for(trainer: Trainer, checkpoint: dict, logger: logging.Logger) -> dict:
    """The checkpoint's optimizer state, without the master weights of an O2 run when this run is not O2: Paddle
    would install them and keep saving them, never updated (the resumed model holds their values already)."""
    state = checkpoint['optimizer']
    if trainer.amp.o2 or 'master_weights' not in state:
        return state
    logger.info('the checkpoint was saved under AMP O2 and this run is not O2: its optimizer\'s float32 master '
                'weights are dropped (the resumed model holds them)')
    return {key: value for key, value in state.items() if key != 'master_weights'}


def _restore_training_state(trainer: Trainer, checkpoint: dict, logger: logging.Logger) -> None:
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


def _build_trainer(config, model, world: World, amp: Amp, steps_per_epoch: int, checkpoint: dict | None,
                   logger: logging.Logger, objective: Objective, task: Task) -> tuple[Trainer, dict]:
    """The task's optimizer and schedule, scaler, EMA (from the loaded weights) and the objective around
    ``model``."""
    model_ema = ModelEma(model, config.TRAIN.MODEL_EMA_DECAY) if config.TRAIN.MODEL_EMA else None
    optimizer, lr_scheduler, settings = task.build_optimizer(config, model, steps_per_epoch, world.size)
    grad_scaler = paddle.amp.GradScaler(
        enable=amp.enabled and amp.dtype == 'float16', init_loss_scaling=config.AMP_INIT_SCALE,
        incr_every_n_steps=config.AMP_INCR_EVERY_N_STEPS, decr_every_n_nan_or_inf=config.AMP_DECR_EVERY_N_NAN_OR_INF)
    if amp.o2:
        model, optimizer = decorate_o2(model, amp, optimizer)
    trainer = Trainer(model=paddle.DataParallel(model) if world.size > 1 else model, module=model,
                      optimizer=optimizer, lr_scheduler=lr_scheduler, grad_scaler=grad_scaler,
                      objective=objective, world=world, amp=amp,
                      model_ema=model_ema, accum_iter=config.TRAIN.ACCUM_ITER,
                      global_step=config.TRAIN.LAST_EPOCH * steps_per_epoch)
    if checkpoint is not None:
        _restore_training_state(trainer, checkpoint, logger)
    return trainer, settings


def _evaluation_model(config, model):
    """The loaded model, or its exported copy in Paddle Inference when EVAL_BACKEND asks for one."""
    backend = config.EVAL_BACKEND
    if backend == 'dygraph':
        return model
    if not paddle.get_device().startswith('cpu'):
        raise ConfigError(f'EVAL_BACKEND {backend} runs Paddle Inference on the CPU; on {paddle.get_device()} '
                          'use EVAL_BACKEND dygraph (with -amp for reduced precision)')
    return PredictorAsModel(model, config, 'bf16' if backend == 'inference_bf16' else 'fp32')


def _datasets(config, world: World, task: Task) -> tuple:
    """(val set or None, train set or None under -eval), their lists checked once per machine."""
    with lists_checked_once_per_machine(world.local_rank, world.size > 1):
        val_set = task.build_val_set(config) if task.evaluates else None
        train_set = None if config.EVAL else task.build_train_set(config)
    return val_set, train_set


def check_run_config(config, task: Task) -> None:
    """What the config alone makes impossible for ``task``: raises ConfigError (or RunFolderBusyError)."""
    if config.EVAL and config.MODEL.RESUME:
        raise ConfigError('-eval evaluates the -pretrained weights (a training checkpoint works there); '
                          '-resume continues training')
    task.check_config(config)
    run_folder.check_free(config.SAVE)
    if config.EVAL and not config.MODEL.PRETRAINED:
        raise ConfigError('-eval needs -pretrained WEIGHTS (converted weights or a training checkpoint): '
                          'it never evaluates a randomly initialised model')


def check_before_launch(config, task: Task) -> None:
    """What ``prepare`` checks without building the model: the config, the output folder, the list files (read
    once per machine: the processes then reuse them) and that the weight files exist. The launching process runs
    it before it starts any; the processes check the rest (the files' contents) before they write anything."""
    check_run_config(config, task)
    _datasets(config, World(), task)
    resuming = config.MODEL.RESUME and not config.EVAL
    if resuming:
        resolve_resume_path(config.MODEL.RESUME)
    if config.MODEL.PRETRAINED and (not resuming or task.split is not None):
        check_pretrained_path(config.MODEL.PRETRAINED)


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


def _fused_attention_note(config, model) -> str:
    """What MODEL.FUSED_ATTN does in this run, for the log ('' when it is off)."""
    if not config.MODEL.FUSED_ATTN:
        return ''
    if any(getattr(layer, 'fused', False) for layer in model.sublayers(include_self=True)):
        return 'MODEL.FUSED_ATTN: scaled_dot_product_attention (flash) where the attention bias is not trained'
    return ('MODEL.FUSED_ATTN: the explicit attention (sdpa runs a fused kernel only in float16/bfloat16 on a GPU of '
            'compute capability 8.0 or newer, and its math fallback is slower)')


def prepare(config, world: World, logger: logging.Logger, task: Task) -> Job:
    """Check every input and build the run in memory; raises an errors.BadInputError, having written nothing."""
    check_run_config(config, task)
    amp = amp_for(config, logger)
    multi_process = world.size > 1
    val_set, train_set = _datasets(config, world, task)
    val_loader = (get_dataloader(config, val_set, 'val', multi_process, local_processes=world.local_size)
                  if task.evaluates else None)
    seed_everything(config.SEED)
    gpu_runtime.set_deterministic(config.DETERMINISTIC, logger)
    model = build_model(config, task, amp)
    note = _fused_attention_note(config, model)
    if note:
        logger.info(note)
    objective = task.build_objective(config, world)
    if config.EVAL:
        epoch = _load_starting_weights(config, model, logger)
        if amp.o2:
            model = decorate_o2(model, amp)
        return Job(config, world, logger, amp, _evaluation_model(config, model), objective, val_set, val_loader,
                   start_epoch=config.TRAIN.LAST_EPOCH if epoch is None else epoch)
    train_loader = get_dataloader(config, train_set, 'train', multi_process, local_processes=world.local_size,
                                  batch_draws=objective.batch_draws)
    steps_per_epoch = len(train_loader) // config.TRAIN.ACCUM_ITER
    if steps_per_epoch == 0:
        raise DatasetError(f'{len(train_loader)} batches per epoch are fewer than TRAIN.ACCUM_ITER '
                           f'{config.TRAIN.ACCUM_ITER}: no optimizer step would run')
    checkpoint, resume_path, saved_part, frozen_weights = _start_from(config, model, task, logger)
    start_epoch = checkpoint['epoch'] if checkpoint is not None else config.TRAIN.LAST_EPOCH
    if start_epoch >= config.TRAIN.NUM_EPOCHS:
        raise ConfigError(f'{start_epoch} epochs are already done and TRAIN.NUM_EPOCHS is '
                          f'{config.TRAIN.NUM_EPOCHS}: nothing to train')
    _refuse_to_overwrite(config.SAVE, start_epoch + 1, config.TRAIN.NUM_EPOCHS, resuming=checkpoint is not None)
    trainer, settings = _build_trainer(config, model, world, amp, steps_per_epoch, checkpoint, logger, objective,
                                       task)
    resumed = checkpoint or {}
    return Job(config, world, logger, amp, model, objective, val_set, val_loader, train_set, train_loader, trainer,
               settings,
               start_epoch, steps_per_epoch, resume_path, best=resumed.get('best'),
               written=checkpoints_written_before(resumed, resume_path, config.SAVE) if checkpoint else [],
               saved_part=saved_part, frozen_weights=frozen_weights)


def open_output(job: Job) -> None:
    """Create and lock the output folder, clear what dead runs left in it; from now on the main process appends
    to log.txt and metrics.jsonl, where a resumed run's repeated epochs replace the earlier lines."""
    if not job.world.is_main:
        return
    folder = job.config.SAVE
    os.makedirs(folder, exist_ok=True)
    job.lock = run_folder.lock(folder)
    attach_log_file(job.logger, os.path.join(folder, 'log.txt'))
    removed = run_folder.remove_stale_temp_files(folder)
    if removed:
        job.logger.info(f'removed temporary files of a run that died while writing: {", ".join(removed)}')
    if job.config.MODEL.RESUME and not job.config.EVAL:
        moved = run_folder.supersede_records_after(folder, job.start_epoch)
        job.logger.info(f'resumed after epoch {job.start_epoch}: log lines of later epochs above this one are '
                        f'superseded; {moved} metrics lines of them moved to {run_folder.SUPERSEDED_FILE}')
    if job.param_settings is not None:
        write_json(os.path.join(folder, 'param_groups.json'), job.param_settings)
    _republish_best(job)


def _republish_best(job: Job) -> None:
    """A run killed between its epoch checkpoint and checkpoint-best.pdparams left an older best file, while that
    checkpoint records its own epoch as the best: resuming from it publishes it again. (Publishing the best first
    would instead lose the older best's weights, which only the best file may hold, when the kill comes between.)"""
    best, path = job.best, job.last_checkpoint
    if best is None or best['epoch'] != job.start_epoch:  # no -resume, or the file was written before it
        return
    folder = job.config.SAVE
    best_path = os.path.join(folder, BEST_CHECKPOINT)
    if not os.path.samefile(os.path.dirname(os.path.abspath(path)), folder):
        return  # resumed into another folder, which holds no best file of that run
    if os.path.exists(best_path) and os.path.samefile(path, best_path):
        return  # the best file is that checkpoint already (a hard link of it, or -resume named it)
    publish_copy(path, best_path)
    job.logger.info(f'saved {best_path} again from {path}, the epoch {best["epoch"]} it records as the best')


def _bad_images(job: Job, dataset) -> int:
    """Undecodable images replaced so far (DATA.BAD_IMAGE_POLICY 'skip'), summed over the processes."""
    count = int(all_reduce_sum(paddle.to_tensor([float(dataset.bad_images)], dtype='float64'), job.world)[0])
    if count:
        job.logger.warning(f'{count} undecodable images were replaced by other samples '
                           f'(DATA.BAD_IMAGE_POLICY skip; the dataset logged their paths)')
    return count


def _record(job: Job, record: dict) -> None:
    if job.world.is_main:
        append_jsonl(os.path.join(job.config.SAVE, 'metrics.jsonl'), record)


def _evaluate_and_log(job: Job, model, label: str) -> dict:
    result = evaluate(model, job.val_loader, job.world, job.amp, job.objective)
    metrics = ' '.join(f'{key} {result[key]}' if isinstance(result[key], int) else f'{key} {result[key]:.4f}'
                       for key in job.objective.logged)
    job.logger.info(f'{label}: {metrics} on {result["num_samples"]} images ({result["images_per_sec"]:.1f} images/s)')
    return result


def _validate(job: Job, epoch: int, lr: float) -> dict:
    trainer = job.trainer
    result = _evaluate_and_log(job, trainer.module, f'epoch {epoch} val')
    record = {'split': 'val', 'epoch': epoch, **_metric_fields(result), 'lr': lr,
              'bad_images': _bad_images(job, job.val_set)}
    if trainer.model_ema is not None:
        ema = _evaluate_and_log(job, trainer.model_ema.module, f'epoch {epoch} val EMA')
        record.update({f'ema_{key}': ema[key] for key in job.objective.logged})
    _record(job, record)
    return record


def _metric_fields(result: dict) -> dict:
    """What metrics.jsonl records of a result: its metrics, sample count and throughput (not the seconds)."""
    return {key: value for key, value in result.items() if key != 'time'}


def _write_checkpoint(job: Job, path: str, epoch: int, written: list[str]) -> None:
    trainer = job.trainer
    save_checkpoint(path, model=job.saved_part, optimizer=trainer.optimizer, lr_scheduler=trainer.lr_scheduler,
                    grad_scaler=trainer.grad_scaler, model_ema=trainer.model_ema, epoch=epoch,
                    global_step=trainer.global_step, config=job.config, best=job.best, written=written,
                    frozen_weights=job.frozen_weights, o2=job.amp.o2)


def _save(job: Job, epoch: int) -> None:
    """The epoch's checkpoint; then, with it on disk, the oldest of this run's beyond KEEP_CHECKPOINTS go (the
    checkpoint lists them, so a run killed in between deletes them once resumed)."""
    if not job.world.is_main:
        return
    path = checkpoint_path(job.config.SAVE, epoch)
    written = [*job.written, path]
    _write_checkpoint(job, path, epoch, written)
    job.last_checkpoint = path
    job.logger.info(f'saved {path}')
    job.written = keep_newest(written, job.config.KEEP_CHECKPOINTS)


def _track_best(job: Job, epoch: int, record: dict) -> bool:
    """Whether this evaluation is the best so far by the objective's metric (top-1 for classification), of the EMA
    weights when there is an EMA (timm's rule)."""
    metric = job.objective.metric
    weights = 'EMA' if f'ema_{metric}' in record else 'model'
    value = record[f'ema_{metric}' if weights == 'EMA' else metric]
    improved = job.best is None or value > job.best[metric]
    if improved:
        job.best = {metric: value, 'epoch': epoch, 'weights': weights}
    best = job.best
    job.logger.info(f'best val {metric} so far {best[metric]:.4f} (epoch {best["epoch"]}, {best["weights"]} weights)')
    return improved


def _save_best(job: Job, epoch: int) -> None:
    """checkpoint-best.pdparams: a link to (or copy of) the epoch's checkpoint, or a checkpoint of its own."""
    if not job.world.is_main:
        return
    path = os.path.join(job.config.SAVE, BEST_CHECKPOINT)
    if job.last_checkpoint == checkpoint_path(job.config.SAVE, epoch):
        publish_copy(job.last_checkpoint, path)
    else:
        _write_checkpoint(job, path, epoch, job.written)
    job.logger.info(f'saved {path} (epoch {epoch}, by the val {job.objective.metric} of the {job.best["weights"]} '
                    'weights)')


def _due(epoch: int, every: int, last: int) -> bool:
    return epoch % every == 0 or epoch == last


def _start_epoch(job: Job, epoch: int) -> None:
    """Data order, augmentations, mixup and drop path of an epoch depend on (SEED, epoch, rank) only, so a run
    resumed from an epoch's checkpoint repeats exactly what an uninterrupted run does."""
    seed = derived_seed(job.config.SEED, epoch, job.world.rank)
    seed_everything(seed)
    job.trainer.objective.reseed(seed)
    job.train_set.reseed(seed)
    job.train_loader.batch_sampler.set_epoch(epoch)


def train(job: Job) -> None:
    config, logger = job.config, job.logger
    num_epochs = config.TRAIN.NUM_EPOCHS
    logger.info(f'training epochs {job.start_epoch + 1}..{num_epochs}: {job.steps_per_epoch} optimizer steps of '
                f'{config.TRAIN.ACCUM_ITER} x {config.DATA.BATCH_SIZE} images x {job.world.size} processes')
    for epoch in range(job.start_epoch + 1, num_epochs + 1):
        _start_epoch(job, epoch)
        try:
            result = train_one_epoch(job.trainer, job.train_loader, epoch, num_epochs, job.steps_per_epoch,
                                     config.REPORT_FREQ, logger)
        except NonFiniteLossError as err:
            kept = job.last_checkpoint or 'none was saved yet'
            raise NonFiniteLossError(f'{err}. The last good checkpoint: {kept}') from None
        metric = job.objective.metric
        logger.info(f'epoch {epoch} train: loss {result["loss"]:.4f} {metric} {result[metric]:.4f} '
                    f'time {result["time"]:.1f}s ({result["images_per_sec"]:.1f} images/s), '
                    f'{result["skipped_steps"]} steps skipped for inf/nan gradients')
        _record(job, {'split': 'train', 'epoch': epoch, **_metric_fields(result),
                      'bad_images': _bad_images(job, job.train_set)})
        improved = False
        if job.val_loader is not None and _due(epoch, config.VALIDATE_FREQ, num_epochs):
            improved = _track_best(job, epoch, _validate(job, epoch, result['lr']))
        if _due(epoch, config.SAVE_FREQ, num_epochs):
            _save(job, epoch)
        if improved:
            _save_best(job, epoch)


def evaluate_weights(job: Job) -> dict:
    if job.config.EVAL_BACKEND != 'dygraph':
        job.logger.info(f'evaluating the exported model in Paddle Inference ({job.config.EVAL_BACKEND})')
    result = _evaluate_and_log(job, job.model, 'val')
    record = {'split': 'val', 'epoch': job.start_epoch, **_metric_fields(result), 'lr': None,
              'bad_images': _bad_images(job, job.val_set), 'weights': job.config.MODEL.PRETRAINED}
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
