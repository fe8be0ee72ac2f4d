#!/usr/bin/env bash
# Set up (if needed) and run the test suite offline; arguments go to pytest:
#   bash scripts/test.sh -m "not integration"   # only the unit tests (tests/unit/)
#   bash scripts/test.sh -m integration         # only the end-to-end tests (tests/integration/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
ruff check .
mypy  # the files listed in [tool.mypy] of pyproject.toml
# the documentation site, strict: a broken link, anchor or API reference fails the run
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
python -m pytest -q "$@"
