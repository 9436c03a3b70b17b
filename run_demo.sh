#!/usr/bin/env bash
# README command 1: fine-tune a tiny BEiT on the embedded Fashion-MNIST set (data/fashion_mnist) with the full
# recipe, one process per GPU (2 CPU processes over gloo without one), evaluate each epoch, and plot the curves.
# Writes a new folder each run (never overwrites one), or -output DIR: log.txt, metrics.jsonl, checkpoints, curves.png.
# An installed Paddle 3.x, GPU build included, is kept (install_check.py says why).
set -euo pipefail
cd "$(dirname "$0")"
OUTPUT=${OUTPUT:-./output/demo-$(date +%Y%m%d-%H%M%S)}
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; i++)); do  # -output DIR among the flags: train and plot there (the last one wins)
  if [[ ${args[i]} == -output ]]; then OUTPUT=${args[i + 1]}; fi
done
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
python -m install_check requirements requirements.txt >"$requirements"
python -m pip install -q --disable-pip-version-check -r "$requirements"
NPROC=${NPROC:-$(python -m install_check demo-processes)}
python main_multi_gpu.py -ngpus "$NPROC" -cfg configs/beit_tiny_fashion_mnist.yaml -output "$OUTPUT" "$@"
python plot_metrics.py -output "$OUTPUT"
