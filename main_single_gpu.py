"""Train or evaluate BEiT in one process: one GPU, or the CPU with all its cores.

    python main_single_gpu.py -cfg configs/beit_base_patch16_224.yaml -dataset imagenet2012 -batch_size 64 \
        -data_path /dataset/imagenet [-eval -pretrained beit_base_patch16_224.pdparams] [-amp]
"""
import sys

from cli import launch
from task_finetune import FINE_TUNING


def main(argv=None) -> int:
    return launch(argv, task=FINE_TUNING, description='Train or evaluate BEiT in one process', one_process=True)


if __name__ == '__main__':
    sys.exit(main())
