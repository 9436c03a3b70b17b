"""Semantic segmentation with BEiT + UperNet (unilm's recipe, the SEG config keys): one process, or one per GPU,
through the fine-tuning engine.

    python main_segment.py -cfg configs/upernet_beit_base_640_ade20k.yaml -data_path /dataset/ADEChallengeData2016 \
        -pretrained beit_base_patch16_224_pt22k_ft22k.pdparams [-resume ./output] [-eval]

-pretrained takes a classification or pre-training file (fitted into the backbone: bias tables resampled to the
crop's grid, a shared table spread to every block, the fpn and heads freshly initialised; the log lists it) or a
segmentor's (a checkpoint of this script, or load_seg_weights.py's conversion; -eval needs one). Each evaluation
writes mIoU, aAcc, mAcc and the per-class IoU to log.txt and metrics.jsonl. The other flags and the processes are
main_multi_gpu.py's.
"""
import sys

from cli import launch
from task_segment import SEGMENTATION


def main(argv=None) -> int:
    return launch(argv, task=SEGMENTATION, description='Semantic segmentation: BEiT + UperNet')


if __name__ == '__main__':
    sys.exit(main())
