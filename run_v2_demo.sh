#!/usr/bin/env bash
# The BEiT v2 demo on the embedded Fashion-MNIST set (data/fashion_mnist), end to end on a CPU: the classification
# demo's model as the teacher (trained here first unless TEACHER=<its checkpoint> is given), a tiny VQ-KD tokenizer
# distilling its patch features, the tiny v2 model pre-trained on that tokenizer's codes, then a linear probe and a
# short fine-tuning from the pre-trained weights and from random ones. One process per GPU (2 CPU processes over
# gloo without one). Each step writes its own run folder in -output DIR (default: a new ./output/v2-demo-<time>):
# teacher, tokenizer, pretrain, probe-{pretrained,random}, finetune-{pretrained,random}. Other flags (e.g. -opts
# TRAIN.NUM_EPOCHS 1) go to every training step after the demo's own settings; the probes take only their epochs,
# PROBE_EPOCHS (default 20: linear probing refuses TRAIN.NUM_EPOCHS, whose meaning it replaces).
set -euo pipefail
source "$(dirname "$0")/demo_setup.sh" v2-demo "$@"  # OUTPUT, FLAGS, NPROC, the requirements installed
run() {  # run SCRIPT CONFIG FOLDER [flags]: one step of the demo in $OUTPUT/FOLDER, then its curves
  local script=$1 config=$2 folder=$OUTPUT/$3
  shift 3
  python "$script" -ngpus "$NPROC" -cfg "$config" -output "$folder" "$@"
  python plot_metrics.py -output "$folder"
}
newest_checkpoint() { ls "$1"/checkpoint-epoch-*.pdparams | sort -V | tail -n 1; }

if [[ -z ${TEACHER:-} ]]; then
  run main_multi_gpu.py configs/beit_tiny_fashion_mnist.yaml teacher "${FLAGS[@]}"
  TEACHER=$OUTPUT/teacher/checkpoint-best.pdparams
fi
run main_tokenizer.py configs/vqkd_tiny_fashion_mnist.yaml tokenizer -opts VQKD.TEACHER_WEIGHTS "$TEACHER" "${FLAGS[@]}"
pretraining=configs/beitv2_tiny_pretrain_fashion_mnist.yaml
run main_pretrain.py "$pretraining" pretrain -opts PRETRAIN.TOKENIZER_WEIGHTS "$OUTPUT/tokenizer/checkpoint-best.pdparams" \
  "${FLAGS[@]}"
pretrained=$(newest_checkpoint "$OUTPUT/pretrain")
for start in pretrained random; do
  weights=()
  if [[ $start == pretrained ]]; then weights=(-pretrained "$pretrained"); fi
  run main_linprobe.py "$pretraining" "probe-$start" "${weights[@]}" \
    -opts LINPROBE.NUM_EPOCHS "${PROBE_EPOCHS:-20}" LINPROBE.BASE_LR 0.4
  run main_multi_gpu.py configs/beit_tiny_fashion_mnist.yaml "finetune-$start" "${weights[@]}" \
    -opts TRAIN.NUM_EPOCHS 10 TRAIN.MODEL_EMA False "${FLAGS[@]}"
done
