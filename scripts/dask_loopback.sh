#!/usr/bin/env bash
# The multi-machine path, end to end on loopback: a Dask scheduler and two
# workers started with Dask's own commands, the quickstart spec run against
# them, then everything stopped. Usage: bash scripts/dask_loopback.sh [LEDGER]
set -euo pipefail
cd "$(dirname "$0")/.."
ledger="${1:-.parroles/loopback.duckdb}"
port="${PARROLES_DASK_PORT:-8786}"
address="tcp://127.0.0.1:${port}"
logs="$(mktemp -d)"
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; }
trap stop EXIT

dask scheduler --host 127.0.0.1 --port "$port" --no-dashboard >"$logs/scheduler.log" 2>&1 &
pids+=($!)
for n in 1 2; do
  dask worker "$address" --nthreads 1 --nworkers 1 --no-dashboard --name "loopback-$n" >"$logs/worker-$n.log" 2>&1 &
  pids+=($!)
done
python - "$address" <<'PY'
import sys
from distributed import Client
with Client(sys.argv[1], timeout="30s") as client:
    client.wait_for_workers(2, timeout=60)
PY
parroles run examples/quickstart.toml --scheduler "$address" --ledger "$ledger"
echo "logs of the scheduler and workers: $logs"
