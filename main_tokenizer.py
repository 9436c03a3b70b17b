"""Train BEiT v2's VQ-KD tokenizer (unilm's run_vqkd_training.py): one process, or one per GPU, through the
fine-tuning engine.

    python main_tokenizer.py -cfg configs/vqkd_tiny_fashion_mnist.yaml -output ./tokenizer \
        -opts VQKD.TEACHER_WEIGHTS demo/checkpoint-best.pdparams [-resume ./tokenizer] [-ngpus 2]

The encoder learns to reproduce the patch features of the frozen teacher (VQKD.TEACHER, VQKD.TEACHER_CFG,
VQKD.TEACHER_WEIGHTS) through an EMA codebook of VQKD.CODEBOOK_SIZE codes. Every epoch records the losses and the
codebook usage (codes the epoch's batches picked) of the train and val splits (metrics.jsonl; the val line of
log.txt); checkpoint-best.pdparams is the best val reconstruction (rec_cosine). A checkpoint is the tokenizer of
pre-training as it is: ``-opts PRETRAIN.TOKENIZER vqkd PRETRAIN.TOKENIZER_WEIGHTS .../checkpoint-best.pdparams``.
The other flags and the processes are main_multi_gpu.py's.
"""
import sys

from cli import launch
from task_tokenizer import TOKENIZER_TRAINING


def main(argv=None) -> int:
    return launch(argv, task=TOKENIZER_TRAINING, description='Train the VQ-KD tokenizer of BEiT v2')


if __name__ == '__main__':
    sys.exit(main())
