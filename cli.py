"""The command line of every main script: flags into a config, exit codes, and the launch of a task (in this
process, or in one process per device) with bad input reported as one clear line. Each main_*.py names its task
and description and calls ``launch``.

Exit codes (errors.py): 0 done, EXIT_BAD_INPUT (2) for input the user can fix (an errors.BadInputError: nothing
was written), EXIT_TRAINING_FAILED (1) when training diverged or a process failed.
"""
import argparse
import logging
import multiprocessing
import os
import sys
import tempfile

import paddle
import paddle.distributed as dist
from yacs.config import CfgNode as CN

from config import (
    ConfigError,
    get_config,
    get_default_config,
    lookup,
    merge_opts,
    merge_yaml,
    set_value,
    validate_config,
)
from engine import NonFiniteLossError
from errors import EXIT_BAD_INPUT, EXIT_TRAINING_FAILED, BadInputError
from job import check_before_launch, execute
from run_folder import resumed_folder
from sample_table import lists_checked_once
from tasks import Task
from utils import LOGGER_NAME, die_with_parent, start_logger

_FLAG_TO_KEY = {
    'dataset': 'DATA.DATASET',
    'data_path': 'DATA.DATA_PATH',
    'batch_size': 'DATA.BATCH_SIZE',
    'batch_size_eval': 'DATA.BATCH_SIZE_EVAL',
    'image_size': 'DATA.IMAGE_SIZE',
    'num_classes': 'MODEL.NUM_CLASSES',
    'pretrained': 'MODEL.PRETRAINED',
    'resume': 'MODEL.RESUME',
    'last_epoch': 'TRAIN.LAST_EPOCH',
    'accum_iter': 'TRAIN.ACCUM_ITER',
    'output': 'SAVE',
    'ngpus': 'NGPUS',
}


def build_arg_parser(description: str = 'BEiT') -> argparse.ArgumentParser:
    """The single-dash flags shared by every script."""
    parser = argparse.ArgumentParser(description)
    parser.add_argument('-cfg', type=str, default=None, help='YAML config file')
    for flag in ('dataset', 'data_path', 'pretrained', 'resume', 'output'):
        parser.add_argument(f'-{flag}', type=str, default=None)
    for flag in ('batch_size', 'batch_size_eval', 'image_size', 'num_classes', 'last_epoch', 'accum_iter', 'ngpus'):
        parser.add_argument(f'-{flag}', type=int, default=None)
    parser.add_argument('-eval', action='store_true', help='evaluate only')
    parser.add_argument('-amp', action='store_true', help='mixed precision (AMP_LEVEL, AMP_DTYPE)')
    parser.add_argument('-trust_pickle', action='store_true',
                        help='read .pdparams files with plain pickle, which runs any code they hold (only for files '
                             'you trust that pickle more than tensors)')
    parser.add_argument('-opts', nargs='+', action='extend', default=[], metavar='KEY VALUE',
                        help='override config keys, e.g. -opts TRAIN.BASE_LR 1e-3 MODEL.DROPPATH 0.2 (given twice, '
                             'both apply in order)')
    return parser


def add_predictor_flags(parser: argparse.ArgumentParser, export_help: str) -> None:
    """The flags of a predicting script (predict.py, predict_segment.py): images, and which weights run them."""
    parser.add_argument('images', nargs='+', metavar='IMAGE')
    parser.add_argument('-inference_model', default=None, metavar='PREFIX', help=export_help)
    parser.add_argument('-ema', action='store_true', help="a training checkpoint's EMA weights instead of its model")
    parser.add_argument('-json', action='store_true', help='print JSON instead of text')


def check_predictor_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one source of weights: -pretrained (with -ema if wanted) or an exported model."""
    if args.inference_model and (args.pretrained or args.ema):
        parser.error('-inference_model runs an exported model: drop -pretrained / -ema')
    if not args.inference_model and not args.pretrained:
        parser.error('give -pretrained WEIGHTS (with -cfg) or -inference_model PREFIX')


def update_config(config: CN, args: argparse.Namespace, task: Task | None = None) -> CN:
    """Apply the command-line flags (then -opts) to ``config``, then ``task``'s own keys (Task.own_keys) to the
    shared ones they replace; validate and freeze it."""
    own_keys = dict(task.own_keys) if task is not None else {}
    config.defrost()
    if getattr(args, 'cfg', None):
        merge_yaml(config, args.cfg)
    for flag, key in _FLAG_TO_KEY.items():
        value = getattr(args, flag, None)
        if value is not None:
            set_value(config, own_keys.get(key, key), value, f'-{flag}')
    if getattr(args, 'eval', False):
        config.EVAL = True
        if getattr(args, 'batch_size', None) is not None and getattr(args, 'batch_size_eval', None) is None:
            # the usage document evaluates with `-eval -batch_size N`: N is then the evaluation batch
            set_value(config, 'DATA.BATCH_SIZE_EVAL', args.batch_size, '-batch_size')
    if getattr(args, 'amp', False):
        config.AMP = True
    if getattr(args, 'trust_pickle', False):
        config.TRUST_PICKLE = True
    opts = getattr(args, 'opts', None) or []
    _refuse_replaced_keys(opts, own_keys, task)
    merge_opts(config, opts)
    validate_config(config)  # before the copies: a bad value is named by the key that was set (checked alike)
    _continue_in_resumed_folder(config)
    for shared, own in own_keys.items():
        set_value(config, shared, lookup(config, own), own)
    config.freeze()
    return config


def _continue_in_resumed_folder(config: CN) -> None:
    """-resume continues the run in its folder unless -output (or SAVE anywhere) names another."""
    if config.MODEL.RESUME and not config.EVAL and config.SAVE == get_default_config().SAVE:
        config.SAVE = resumed_folder(config.MODEL.RESUME)


def _refuse_replaced_keys(opts, own_keys: dict, task: Task | None) -> None:
    """A key the task replaces by its own would be silently ignored: -opts must name the task's key."""
    for key in opts[0::2]:
        if key in own_keys:
            raise ConfigError(f'-opts: {task.name} takes {key} from {own_keys[key]}: set {own_keys[key]} instead')


def parse_config(argv, description: str, task: Task | None = None):
    """The config of ``task`` from the command line (the flags of build_arg_parser), or None after printing why
    not."""
    args = build_arg_parser(description).parse_args(argv)
    try:
        return update_config(get_config(), args, task)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return None


def launch(argv, *, task: Task, description: str, one_process: bool = False) -> int:
    """A main script's whole run of ``task`` as the command line says, and its exit code: in this process with
    ``one_process`` or under ``python -m paddle.distributed.launch`` (which started the processes), else in
    process_count(config) processes (paddle.distributed.spawn when more than one)."""
    config = parse_config(argv, description, task)
    if config is None:
        return EXIT_BAD_INPUT
    if one_process:
        return run(config, multi_process=False, task=task)
    if launched_by_paddle():
        die_with_parent()  # the launcher's controller
        return run(config, multi_process=True, task=task)
    nprocs = process_count(config)
    if nprocs == 1:
        return run(config, multi_process=False, task=task)
    with lists_checked_once(tempfile.mkdtemp(prefix='beit-sample-tables-')):  # here, for every process
        return check_inputs(config, task) or _spawn_and_wait(config, task, nprocs)


def launched_by_paddle() -> bool:
    """paddle.distributed.launch (and spawn) describe the job to each process in PADDLE_* variables."""
    return 'PADDLE_TRAINERS_NUM' in os.environ


def visible_gpus() -> int:
    """The GPUs this Paddle can use (CUDA_VISIBLE_DEVICES applies); 0 for a CPU build."""
    return paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0


def process_count(config) -> int:
    """NGPUS (-ngpus) when set, else every visible GPU; a CPU-only machine runs one process unless told."""
    return config.NGPUS if config.NGPUS > 0 else max(1, visible_gpus())


def check_gpus_visible(config) -> None:
    """-ngpus N needs N visible GPUs on a GPU build (a CPU build runs N processes over gloo)."""
    visible = visible_gpus()
    if 0 < visible < config.NGPUS:
        raise ConfigError(f'-ngpus {config.NGPUS}: only {visible} GPUs are visible (CUDA_VISIBLE_DEVICES)')


def run(config, multi_process: bool, task: Task) -> int:
    """Run this process's part of ``task`` and return the exit code, after printing a clear message for a failure
    the user can fix (bad input) or a diverged training."""
    return _exit_code(lambda: execute(config, multi_process, task), logging.getLogger(LOGGER_NAME).error)


def check_inputs(config, task: Task) -> int:
    """In the launching process, before it starts any: the GPUs -ngpus asks for, then job.check_before_launch; 0,
    or EXIT_BAD_INPUT after the message."""
    def check():
        check_gpus_visible(config)
        check_before_launch(config, task)
    return _exit_code(check, start_logger(is_main=False).error)


def _exit_code(step, report) -> int:
    """The exit code of ``step()``: 0, or EXIT_BAD_INPUT for input the user can fix and EXIT_TRAINING_FAILED for a
    diverged training, each after ``report``ing the one-line reason. The one place bad input becomes exit 2."""
    try:
        step()
    except BadInputError as err:
        report(f'error: {err}')
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:
        report(f'error: {err}')
        return EXIT_TRAINING_FAILED
    return 0


def _spawned_process(config, task: Task) -> None:
    # spawn's children inherit its start method, so their DataLoader workers would be spawned too: each would
    # import everything and unpickle a copy of the dataset (far slower to the first batch on an ImageNet list than
    # forked, as in one process or under paddle.distributed.launch: docs/imagenet_startup.md).
    if 'fork' in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method('fork', force=True)
    die_with_parent()
    code = run(config, multi_process=True, task=task)
    if code:
        sys.exit(code)


def _spawn_and_wait(config, task: Task, nprocs: int) -> int:
    """Run the processes to the end. A process that found bad input printed why and wrote nothing: the run then
    exits with EXIT_BAD_INPUT, as one process would."""
    context = None
    try:
        context = dist.spawn(_spawned_process, args=(config, task), nprocs=nprocs, join=False)
        while not context.join():
            pass
    except Exception as err:  # spawn re-raises a failed process's exit or traceback as a plain Exception
        if context is not None and any(p.exitcode == EXIT_BAD_INPUT for p in context.processes):
            return EXIT_BAD_INPUT
        print(f'error: a training process failed: {err}', file=sys.stderr)
        return EXIT_TRAINING_FAILED
    return 0
