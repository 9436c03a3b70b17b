"""Linear probing of a frozen BEiT (unilm's protocol, the LINPROBE config keys): one process, or one per GPU,
through the fine-tuning engine.

    python main_linprobe.py -cfg configs/beit_base_patch16_224_pt22k.yaml -data_path /dataset/imagenet \
        -pretrained beit_base_patch16_224_pt22k.pdparams [-batch_size 128] [-resume ./output]

-pretrained takes any weights fine-tuning loads (converted, or a training checkpoint of pre-training or
fine-tuning); without it the encoder keeps its seeded random weights, the baseline. A classifier per block
(LINPROBE.BLOCKS) learns on concat(cls token, mean of the patch tokens); each evaluation writes every block's
accuracy to log.txt and metrics.jsonl and names the best block. Checkpoints hold the classifiers: -resume needs the
same -pretrained. -batch_size sets LINPROBE.BATCH_SIZE; the other flags and the processes are main_multi_gpu.py's.
"""
import sys

from cli import launch
from task_linprobe import LINEAR_PROBING


def main(argv=None) -> int:
    return launch(argv, task=LINEAR_PROBING, description='Linear probing of a frozen BEiT, a classifier per block')


if __name__ == '__main__':
    sys.exit(main())
