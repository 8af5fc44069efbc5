"""Getting the ledger out: every table to files, and a batch as a Chrome trace.

Both only read the ledger. The trace opens in Perfetto or chrome://tracing:
one lane per worker pid for run time (with the role's events as instant
marks), and one lane per role for the time it waited in the queue.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from parroles.errors import ConfigError, LedgerError
from parroles.ledger import Ledger
from parroles.ledger import db as ledger_db

TABLES = ("batches", "runs", "events", "schema_version")
FORMATS = {"parquet": "(FORMAT parquet)", "csv": "(FORMAT csv, HEADER true)"}


def export_tables(ledger_path: str, folder: str | Path, fmt: str, busy_timeout: float = 5.0) -> list[Path]:
    """Write each ledger table to ``folder/TABLE.FORMAT`` with DuckDB's own COPY."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(f"cannot create {folder}: {exc.strerror}") from exc
    written = []
    with ledger_db.connect(ledger_path, read_only=True, busy_timeout=busy_timeout) as con:
        for table in TABLES:
            target = folder / f"{table}.{fmt}"
            quoted = str(target).replace("'", "''")
            con.execute(f"COPY {table} TO '{quoted}' {FORMATS[fmt]}")
            written.append(target)
    return written


def _micros(moment: dt.datetime, origin: dt.datetime) -> float:
    return (moment - origin).total_seconds() * 1e6


def batch_trace(ledger: Ledger, batch_id: str) -> dict[str, Any]:
    """The batch as Chrome Trace Event JSON (a dict ready for json.dump)."""
    batch = ledger.get_batch(batch_id)
    runs = ledger.list_runs(batch_id)
    origin = batch.started_at
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": f"workers of {batch_id}"}},
        {"ph": "M", "name": "process_name", "pid": 2, "tid": 0, "args": {"name": "queue wait"}},
    ]
    for pid in sorted({r.worker_pid for r in runs if r.worker_pid is not None}):
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": pid, "args": {"name": f"worker {pid}"}})
    for position, run in enumerate(runs):
        role = str(run.role)
        events.append({"ph": "M", "name": "thread_name", "pid": 2, "tid": position, "args": {"name": role}})
        queue_end = run.started_at or run.finished_at
        if queue_end is not None:
            events.append({"ph": "X", "name": f"queued: {role}", "cat": "queue", "pid": 2, "tid": position,
                           "ts": _micros(run.queued_at, origin), "dur": _micros(queue_end, run.queued_at),
                           "args": {"run_id": run.run_id}})
        if run.started_at is None or run.worker_pid is None:
            continue
        end = run.finished_at or run.started_at
        args = {"run_id": run.run_id, "status": run.status.value, "attempt": run.attempt}
        if run.error is not None:
            args["error"] = run.error.one_line()
        events.append({"ph": "X", "name": role, "cat": run.status.value, "pid": 1, "tid": run.worker_pid,
                       "ts": _micros(run.started_at, origin), "dur": _micros(end, run.started_at), "args": args})
        for event in ledger.get_events(run.run_id):
            events.append({"ph": "i", "s": "t", "name": event.kind, "pid": 1, "tid": run.worker_pid,
                           "ts": _micros(event.timestamp, origin), "args": {"payload": event.payload}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"batch_id": batch_id}}
