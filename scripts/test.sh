#!/usr/bin/env bash
# Set up (if needed) and run the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
ruff check .
mypy  # the files listed in [tool.mypy] of pyproject.toml
python -m pytest -q "$@"
