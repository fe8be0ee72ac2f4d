#!/usr/bin/env bash
# The CPU benchmark suite (results in benchmarks/results/*.json and *.md). ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
start=$(date +%s)
python benchmarks/tracker_overhead.py
python benchmarks/throughput.py
python benchmarks/nnls.py
python benchmarks/aggregation.py --clients 10 100
python benchmarks/calibration.py
echo "CPU benchmark suite: $(( $(date +%s) - start )) s"
