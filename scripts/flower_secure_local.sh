#!/usr/bin/env bash
# The secure Flower deployment of LIVAR on one machine (loopback), end to end:
#   credentials (livar-flower-certs) -> SuperLink with TLS and SuperNode authentication ->
#   the SuperNodes' public keys registered with `flwr supernode register` -> SuperNodes with the
#   CA and their private keys -> `flwr run` of this checkout -> everything stopped.
#
#   bash scripts/flower_secure_local.sh WORK [NODES] [RUN_CONFIG]
#   bash scripts/flower_secure_local.sh runs/secure 3 "preset='tiny' rounds=2"
#
# WORK (new or empty) gets creds/, one FLWR_HOME and log per process (logs/), and the run's
# results folder (results/). Ports: LIVAR_SUPERLINK_PORT (default 9092) and the NODES ports
# above it. On several machines the same steps apply with the SuperLink's name in the server
# certificate (livar-flower-certs --san) and each SuperNode given ca.crt and its own key only.
set -euo pipefail
WORK=${1:?usage: flower_secure_local.sh WORK [NODES] [RUN_CONFIG]}
NODES=${2:-3}
RUN_CONFIG=${3:-"preset='tiny'"}
PORT=${LIVAR_SUPERLINK_PORT:-9092}
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  echo "flower_secure_local: $WORK exists and is not empty" >&2; exit 2
fi
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
export FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
PIDS=()
stop() { for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap stop EXIT
start() {  # name command...: own process group, FLWR_HOME and log
  local name=$1; shift
  mkdir -p "$WORK/home-$name"
  FLWR_HOME="$WORK/home-$name" setsid "$@" > "$WORK/logs/$name.log" 2>&1 &
  PIDS+=($!)
}
wait_log() {  # file text seconds
  for _ in $(seq "$3"); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 1; done
  echo "flower_secure_local: no '$2' in $1 after $3 s" >&2; tail -20 "$1" >&2; return 1
}

livar-flower-certs "$WORK/creds" --nodes "$NODES" > "$WORK/logs/certs.log"
C="$WORK/creds"
start superlink flower-superlink --host 127.0.0.1 --port "$PORT" \
  --ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.crt" --ssl-keyfile "$C/server.key" \
  --enable-supernode-auth
wait_log "$WORK/logs/superlink.log" "Uvicorn running on https://" 60

export FLWR_HOME="$WORK/home-cli"  # the flwr CLI: TLS with our CA, no `insecure`
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "livar-secure"

[superlink.livar-secure]
address = "127.0.0.1:$PORT"
root-certificates = "$C/ca.crt"
TOML
for m in $(seq 0 $((NODES - 1))); do
  flwr supernode register "$C/supernode-$m.pub" livar-secure >> "$WORK/logs/register.log"
done
for m in $(seq 0 $((NODES - 1))); do
  start "node$m" flower-supernode --superlink "127.0.0.1:$PORT" \
    --root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/supernode-$m.key" \
    --host 127.0.0.1 --port $((PORT + 1 + m)) \
    --node-config "partition-id=$m num-partitions=$NODES"
done
for m in $(seq 0 $((NODES - 1))); do wait_log "$WORK/logs/node$m.log" "SuperNode ID" 120; done
echo "flower_secure_local: SuperLink on https://127.0.0.1:$PORT, $NODES SuperNodes authenticated"
flwr run "$REPO" livar-secure --stream \
  --run-config "$RUN_CONFIG num-clients=$NODES out='$WORK/results'" | tee "$WORK/logs/run.log"
test -f "$WORK/results/summary.json" || { echo "flower_secure_local: the run failed" >&2; exit 1; }
echo "flower_secure_local: results in $WORK/results"
