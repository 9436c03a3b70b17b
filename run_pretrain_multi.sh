#!/bin/sh
# Pre-train BEiT with masked image modeling, one process per GPU (main_pretrain.py). TOKENIZER is the DALL-E
# encoder converted by load_dalle_weights.py; -resume ./output continues from the latest checkpoint there.
# Variables can be set from outside, and extra flags are passed on, e.g.
#   GPUS=0,1,2,3 BATCH_SIZE=64 TOKENIZER=./dalle_encoder.pdparams sh run_pretrain_multi.sh -output ./pretrain
GPUS=${GPUS:-0,1,2,3,4,5,6,7}
CONFIG=${CONFIG:-./configs/beit_base_patch16_224_pt22k.yaml}
DATA_PATH=${DATA_PATH:-/dataset/imagenet}
BATCH_SIZE=${BATCH_SIZE:-128}
TOKENIZER=${TOKENIZER-./dalle_encoder.pdparams}  # empty: a config that allows a random tokenizer

CUDA_VISIBLE_DEVICES=$GPUS \
python main_pretrain.py \
-cfg="$CONFIG" \
-dataset='imagenet2012' \
-batch_size="$BATCH_SIZE" \
-data_path="$DATA_PATH" \
-amp \
-opts PRETRAIN.TOKENIZER_WEIGHTS "$TOKENIZER" \
"$@"
