#!/usr/bin/env bash
# README command 1: fine-tune a tiny BEiT on the embedded Fashion-MNIST set (data/fashion_mnist) with the full
# recipe, one process per GPU (2 CPU processes over gloo without one), evaluate each epoch, and plot the curves.
# Writes a new folder each run (never overwrites one), or -output DIR: log.txt, metrics.jsonl, checkpoints, curves.png.
# An installed Paddle 3.x, GPU build included, is kept (install_check.py says why).
set -euo pipefail
source "$(dirname "$0")/demo_setup.sh" demo "$@"  # OUTPUT, NPROC, the requirements installed
python main_multi_gpu.py -ngpus "$NPROC" -cfg configs/beit_tiny_fashion_mnist.yaml -output "$OUTPUT" "$@"
python plot_metrics.py -output "$OUTPUT"
