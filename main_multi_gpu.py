"""Train or evaluate BEiT in several processes: one per GPU, over NCCL; on a CPU-only machine -ngpus N processes
over gloo. Launched directly it starts the processes itself (paddle.distributed.spawn):

    CUDA_VISIBLE_DEVICES=0,1,2,3 python main_multi_gpu.py -cfg configs/beit_base_patch16_224.yaml \
        -dataset imagenet2012 -batch_size 64 -data_path /dataset/imagenet [-eval -pretrained w.pdparams] [-amp]

Under ``python -m paddle.distributed.launch`` (several machines: --nnodes, --master) it is one of the launched
processes and starts none.
"""
import sys

from cli import launch
from task_finetune import FINE_TUNING


def main(argv=None) -> int:
    return launch(argv, task=FINE_TUNING, description='Train or evaluate BEiT in several processes')


if __name__ == '__main__':
    sys.exit(main())
