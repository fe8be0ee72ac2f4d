#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
# Until the calibration pipeline lands, the main job is a LIVAR run with the CPU preset.
livar-fed --preset cpu --dataset digits --method livar --beta 0.05 --out runs/main-digits-livar --resume "$@"
