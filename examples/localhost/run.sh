#!/usr/bin/env bash
# The localhost federation: a coordinator and three participants as separate processes on
# 127.0.0.1, one horizontal job over HTTP. Prints {job_id, status, rounds, auc, seconds} and
# exits 0 only if the job succeeded. Needs the project's venv (`make test` creates it).
#
#   bash examples/localhost/run.sh            # CUSTOMERS=3000 by default
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="$ROOT/.venv/bin"
WORK="$HERE/work"
CUSTOMERS="${CUSTOMERS:-3000}"
source "$ROOT/examples/lib/federation.sh"

rm -rf "$WORK"
mkdir -p "$WORK/logs"
started=$(date +%s.%N)

echo "preparing three regional stores ($CUSTOMERS customers)..." >&2
"$BIN/python" "$HERE/prepare.py" "$WORK" --customers "$CUSTOMERS" > "$WORK/prepare.json"

start_federation eu-west us-east uk

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
    "rounds": status["rounds_done"],
    "auc": round(metrics["auc"], 4) if "auc" in metrics else None,
    "seconds": round(time.time() - float(sys.argv[2]), 2),
}))
PY
exit "$JOB_STATUS"
