"""The command line of every main script: flags into a config, exit codes, and the run of a task in this process
with bad input reported as one clear line.

Exit codes: 0 done, EXIT_BAD_INPUT (2) for input the user can fix (nothing was written), EXIT_TRAINING_FAILED
(1) when training diverged or a process failed.
"""
import argparse
import logging
import sys

from yacs.config import CfgNode as CN

from config import ConfigError, get_config, lookup, merge_opts, merge_yaml, set_value, validate_config
from engine import NonFiniteLossError
from job import INPUT_ERRORS, check_before_launch, execute
from tasks import Task
from utils import LOGGER_NAME, start_logger

EXIT_BAD_INPUT = 2
EXIT_TRAINING_FAILED = 1

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
    for shared, own in own_keys.items():
        set_value(config, shared, lookup(config, own), own)
    config.freeze()
    return config


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


def run(config, multi_process: bool, task: Task) -> int:
    """Run this process's part of ``task`` and return the exit code, after printing a clear message for a failure
    the user can fix (bad input) or a diverged training."""
    try:
        execute(config, multi_process, task)
    except INPUT_ERRORS as err:
        logging.getLogger(LOGGER_NAME).error(f'error: {err}')
        return EXIT_BAD_INPUT
    except NonFiniteLossError as err:
        logging.getLogger(LOGGER_NAME).error(f'error: {err}')
        return EXIT_TRAINING_FAILED
    return 0


def check_inputs(config, task: Task) -> int:
    """job.check_before_launch in the launching process: 0, or EXIT_BAD_INPUT after the message."""
    logger = start_logger(is_main=False)
    try:
        check_before_launch(config, task)
    except INPUT_ERRORS as err:
        logger.error(f'error: {err}')
        return EXIT_BAD_INPUT
    return 0
