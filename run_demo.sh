#!/usr/bin/env bash
# README command 1: fine-tune a tiny BEiT on the embedded Fashion-MNIST set (data/fashion_mnist) with the full
# recipe in 2 CPU processes (paddle.distributed over gloo), evaluate each epoch, and plot the curves.
# Writes a new folder each run (never overwrites one): log.txt, metrics.jsonl, checkpoints, curves.png.
set -euo pipefail
cd "$(dirname "$0")"
OUTPUT=${OUTPUT:-./output/demo-$(date +%Y%m%d-%H%M%S)}
NPROC=${NPROC:-2}
python -m pip install -q --disable-pip-version-check -r requirements.txt
python main_multi_gpu.py -ngpus "$NPROC" -cfg configs/beit_tiny_fashion_mnist.yaml -output "$OUTPUT" "$@"
python plot_metrics.py -output "$OUTPUT"
