"""Train or evaluate BEiT in one process: one GPU, or the CPU with all its cores.

    python main_single_gpu.py -cfg configs/beit_base_patch16_224.yaml -dataset imagenet2012 -batch_size 64 \
        -data_path /dataset/imagenet [-eval -pretrained beit_base_patch16_224.pdparams] [-amp]
"""
import sys

from cli import EXIT_BAD_INPUT, parse_config, run
from task_finetune import FINE_TUNING


def main(argv=None) -> int:
    config = parse_config(argv, 'Train or evaluate BEiT in one process', FINE_TUNING)
    if config is None:
        return EXIT_BAD_INPUT
    return run(config, multi_process=False, task=FINE_TUNING)


if __name__ == '__main__':
    sys.exit(main())
