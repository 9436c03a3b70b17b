#!/bin/sh
# Evaluate converted weights on the val list with one process per GPU (the original usage document's command).
# Every variable can be set from outside, and extra flags are passed on, e.g.
#   GPUS=0,1 WEIGHTS=./beit_base_patch16_224.pdparams sh run_eval_multi.sh -output ./output/eval
GPUS=${GPUS:-0,1,2,3,4,5,6,7}
CONFIG=${CONFIG:-./configs/beit_base_patch16_224.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
WEIGHTS=${WEIGHTS:-./beit_base_patch16_224.pdparams}
BATCH_SIZE=${BATCH_SIZE:-256}

CUDA_VISIBLE_DEVICES=$GPUS \
python main_multi_gpu.py \
-cfg="$CONFIG" \
-dataset='imagenet2012' \
-batch_size="$BATCH_SIZE" \
-data_path="$DATA_PATH" \
-eval \
-pretrained="$WEIGHTS" \
-amp \
"$@"
