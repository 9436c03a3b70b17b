#!/usr/bin/env bash
# The segmentation demo: train the tiny BEiT + UperNet of configs/beit_tiny_seg_fashion.yaml on the committed
# canvases (data/fashion_seg), one process per GPU (2 CPU processes over gloo without one), then plot the curves
# (curves.png) and the best checkpoint's predictions on the first validation canvases next to their ground truth
# (predictions.png). Writes a new folder each run (never overwrites one), or -output DIR. The flags go to both
# main_segment.py and plot_segmentation.py (-opts SEG.* keys must reach both), which reads the run's best weights.
set -euo pipefail
source "$(dirname "$0")/demo_setup.sh" seg-demo "$@"  # OUTPUT, NPROC, the requirements installed
config=configs/beit_tiny_seg_fashion.yaml
python main_segment.py -ngpus "$NPROC" -cfg "$config" -output "$OUTPUT" "$@"
python plot_metrics.py -output "$OUTPUT"
python plot_segmentation.py -cfg "$config" -output "$OUTPUT" "$@" -pretrained "$OUTPUT/checkpoint-best.pdparams"
