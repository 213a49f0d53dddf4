#!/usr/bin/env bash
# The vertical example: a coordinator and two participants (shop: raw emails + label; brand:
# hashed emails) as separate processes on 127.0.0.1, one SecureBoost job over HTTP, aligned by
# PSI through the relay. Prints {job_id, status, trees, auc, intersection_size, seconds} and exits
# 0 only if the job succeeded. Needs the project's venv (`make test` creates it).
#
#   bash examples/vertical/run.sh            # CUSTOMERS=1000 by default
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="$ROOT/.venv/bin"
WORK="$HERE/work"
CUSTOMERS="${CUSTOMERS:-1000}"
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

[ -x "$BIN/cdp-fl" ] || { echo "run 'make test' first: $BIN/cdp-fl is missing" >&2; exit 2; }
rm -rf "$WORK"
mkdir -p "$WORK/logs"
started=$(date +%s.%N)

echo "preparing the shop's and the brand's files and stores ($CUSTOMERS customers)..." >&2
"$BIN/python" "$HERE/prepare.py" "$WORK" --customers "$CUSTOMERS" > "$WORK/prepare.json"

for name in ops shop brand; do
  role=participant; [ "$name" = ops ] && role=admin
  "$BIN/cdp-fl" coordinator enrol "$name" --role "$role" --config "$HERE/coordinator.yaml" \
    --out "$WORK/secrets/$name.secret" 2>/dev/null
done

"$BIN/cdp-fl" coordinator serve --config "$HERE/coordinator.yaml" --port 0 \
  --port-file "$WORK/port" > "$WORK/logs/coordinator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do
  [ -s "$WORK/port" ] && break
  kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$WORK/logs/coordinator.log" >&2; exit 1; }
  sleep 0.05
done
[ -s "$WORK/port" ] || { echo "the coordinator did not start" >&2; exit 1; }
URL="http://127.0.0.1:$(cat "$WORK/port")"
echo "coordinator on $URL" >&2

for name in shop brand; do
  "$BIN/cdp-fl" participant run --config "$HERE/participant-$name.yaml" --coordinator "$URL" \
    --once > "$WORK/logs/$name.log" 2>&1 &
  PIDS+=($!)
done

# a job may name only enrolled participants: wait until each has redeemed its secret
for _ in $(seq 1 600); do
  ready=1
  for name in shop brand; do [ -s "$WORK/tokens/$name.json" ] || ready=0; done
  [ "$ready" = 1 ] && break
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 5 "$WORK"/logs/*.log >&2; exit 1; }
  done
  sleep 0.1
done

status=0
"$BIN/cdp-fl" job submit "$HERE/job.yaml" --config "$HERE/client.yaml" --coordinator "$URL" \
  --wait --json > "$WORK/status.json" || status=$?

"$BIN/python" - "$WORK/status.json" "$started" <<'PY'
import json, sys, time
try:
    status = json.load(open(sys.argv[1]))
except ValueError:
    status = {"job_id": None, "status": "failed", "rounds_done": 0}
metrics = status.get("metrics") or {}
print(json.dumps({
    "job_id": status["job_id"],
    "status": status["status"],
    "trees": status["rounds_done"],
    "auc": metrics.get("auc"),
    "intersection_size": metrics.get("intersection_size"),
    "error": (status.get("error") or {}).get("message"),
    "seconds": round(time.time() - float(sys.argv[2]), 2),
}))
PY
exit "$status"
