#!/bin/sh
# Fine-tune with one process per GPU (the original usage document's command). -pretrained starts from converted
# weights; -resume ./output continues from the latest checkpoint there. Variables can be set from outside, and
# extra flags are passed on, e.g.
#   GPUS=0,1,2,3 BATCH_SIZE=64 sh run_train_multi.sh -pretrained ./beit_base_patch16_224_pt22k.pdparams
GPUS=${GPUS:-0,1,2,3,4,5,6,7}
CONFIG=${CONFIG:-./configs/beit_base_patch16_224.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-256}

CUDA_VISIBLE_DEVICES=$GPUS \
python main_multi_gpu.py \
-cfg="$CONFIG" \
-dataset='imagenet2012' \
-batch_size="$BATCH_SIZE" \
-data_path="$DATA_PATH" \
-amp \
"$@"
