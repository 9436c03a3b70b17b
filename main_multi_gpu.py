"""Train or evaluate BEiT in several processes: one per GPU, over NCCL; on a CPU-only machine -ngpus N processes
over gloo. Launched directly it starts the processes itself (paddle.distributed.spawn):

    CUDA_VISIBLE_DEVICES=0,1,2,3 python main_multi_gpu.py -cfg configs/beit_base_patch16_224.yaml \
        -dataset imagenet2012 -batch_size 64 -data_path /dataset/imagenet [-eval -pretrained w.pdparams] [-amp]

Under ``python -m paddle.distributed.launch`` (several machines: --nnodes, --master) it is one of the launched
processes and starts none.
"""
import multiprocessing
import os
import sys
import tempfile

import paddle
import paddle.distributed as dist

from cli import EXIT_BAD_INPUT, EXIT_TRAINING_FAILED, check_inputs, parse_config, run
from config import ConfigError
from datasets import lists_checked_once
from task_finetune import FINE_TUNING
from tasks import Task
from utils import die_with_parent


def launched_by_paddle() -> bool:
    """paddle.distributed.launch (and spawn) describe the job to each process in PADDLE_* variables."""
    return 'PADDLE_TRAINERS_NUM' in os.environ


def process_count(config) -> int:
    """NGPUS (-ngpus) when set, else every visible GPU; a CPU-only machine runs one process unless told."""
    visible = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
    if config.NGPUS > 0:
        if visible and visible < config.NGPUS:
            raise ConfigError(f'-ngpus {config.NGPUS}: only {visible} GPUs are visible (CUDA_VISIBLE_DEVICES)')
        return config.NGPUS
    return max(1, visible)


def _spawned_process(config, task: Task) -> None:
    # spawn's children inherit its start method, so their DataLoader workers would be spawned too: each would
    # import everything and unpickle a copy of the dataset (14 s to the first batch on an ImageNet list, against
    # 1 s forked, as in one process or under paddle.distributed.launch).
    if 'fork' in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method('fork', force=True)
    die_with_parent()
    code = run(config, multi_process=True, task=task)
    if code:
        sys.exit(code)


def main(argv=None, task: Task = FINE_TUNING, description: str = 'Train or evaluate BEiT in several processes') -> int:
    """Run ``task`` (fine-tuning or evaluation; main_pretrain.py and main_linprobe.py pass theirs) as the command
    line says."""
    config = parse_config(argv, description, task)
    if config is None:
        return EXIT_BAD_INPUT
    if launched_by_paddle():
        die_with_parent()  # the launcher's controller
        return run(config, multi_process=True, task=task)
    try:
        nprocs = process_count(config)
    except ConfigError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    if nprocs == 1:
        return run(config, multi_process=False, task=task)
    with lists_checked_once(tempfile.mkdtemp(prefix='beit-sample-tables-')):  # here, for every process
        code = check_inputs(config, task)
        if code:
            return code
        return _spawn_and_wait(config, task, nprocs)


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


if __name__ == '__main__':
    sys.exit(main())
