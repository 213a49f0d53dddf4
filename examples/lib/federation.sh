# Shared by the examples' run.sh: start a coordinator and participants as separate processes on
# 127.0.0.1, stop them (by pid) on exit, and submit one job. Sourced, not run; the caller sets
# HERE (its folder, holding coordinator.yaml, client.yaml, participant-NAME.yaml and job.yaml),
# WORK and BIN.
PIDS=()
[ -x "$BIN/cdp-fl" ] || { echo "run 'make test' first: $BIN/cdp-fl is missing" >&2; exit 2; }

stop_federation() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_federation EXIT INT TERM

# start_federation NAME...: enrol an admin (ops) and the participants, serve the coordinator on a
# free port (sets URL), start each participant, wait until all redeemed their enrolment secrets.
start_federation() {
  local name role ready pid
  for name in ops "$@"; do
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

  for name in "$@"; do
    "$BIN/cdp-fl" participant run --config "$HERE/participant-$name.yaml" --coordinator "$URL" \
      --once > "$WORK/logs/$name.log" 2>&1 &
    PIDS+=($!)
  done

  # a job may name only enrolled participants: wait until each has redeemed its secret
  for _ in $(seq 1 600); do
    ready=1
    for name in "$@"; do [ -s "$WORK/tokens/$name.json" ] || ready=0; done
    [ "$ready" = 1 ] && return 0
    for pid in "${PIDS[@]}"; do
      kill -0 "$pid" 2>/dev/null || { tail -n 5 "$WORK"/logs/*.log >&2; exit 1; }
    done
    sleep 0.1
  done
  echo "the participants did not enrol within 60 s" >&2
  exit 1
}

# submit_job: submit $HERE/job.yaml and follow it; the final status lands in $WORK/status.json
# and the exit code of `cdp-fl job submit --wait` in JOB_STATUS.
submit_job() {
  JOB_STATUS=0
  "$BIN/cdp-fl" job submit "$HERE/job.yaml" --config "$HERE/client.yaml" --coordinator "$URL" \
    --wait --json > "$WORK/status.json" || JOB_STATUS=$?
}
