"""Pre-train BEiT with masked image modeling: one process, or one per GPU, through the fine-tuning engine.

    python main_pretrain.py -cfg configs/beit_base_patch16_224_pt22k.yaml -data_path /dataset/imagenet \
        -batch_size 128 -opts PRETRAIN.TOKENIZER_WEIGHTS dalle_encoder.pdparams [-amp] [-resume ./output]

With one visible GPU (or on a CPU without -ngpus) it runs in-process; with several GPUs, or -ngpus N, one process
each (paddle.distributed.spawn); under ``python -m paddle.distributed.launch`` it is one of the launched processes.
The flags are those of main_multi_gpu.py; -pretrained starts from a pre-training checkpoint (ours or unilm's
converted with ``load_pytorch_weights.py -mim``). Its checkpoints start fine-tuning with main_*_gpu.py -pretrained.
"""
import sys

from cli import launch
from task_pretrain import PRETRAINING


def main(argv=None) -> int:
    return launch(argv, task=PRETRAINING, description='Pre-train BEiT (masked image modeling)')


if __name__ == '__main__':
    sys.exit(main())
