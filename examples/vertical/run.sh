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
source "$ROOT/examples/lib/federation.sh"

rm -rf "$WORK"
mkdir -p "$WORK/logs"
started=$(date +%s.%N)

echo "preparing the shop's and the brand's files and stores ($CUSTOMERS customers)..." >&2
"$BIN/python" "$HERE/prepare.py" "$WORK" --customers "$CUSTOMERS" > "$WORK/prepare.json"

start_federation shop brand

submit_job

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
exit "$JOB_STATUS"
