"""Getting the ledger out: every table to files, and a batch as a Chrome trace.

Both only read the ledger. The trace opens in Perfetto or chrome://tracing:
one lane per worker pid for run time (with the role's events as instant
marks), one lane per role for the time it waited in the queue, and a flow
arrow for each handoff, from the end of the run that handed its output over
to the start of the run that received it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parroles.errors import ConfigError, LedgerError
from parroles.ledger import Ledger
from parroles.ledger import db as ledger_db
from parroles.ledger.lineage import batch_handoffs
from parroles.results import RunRecord

if TYPE_CHECKING:
    import duckdb

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
        for schema, table in ledger_tables(con):
            target = folder / f"{_file_name(table if schema == 'main' else f'{schema}.{table}')}.{fmt}"
            quoted = str(target).replace("'", "''")
            con.execute(f"COPY {_identifier(schema)}.{_identifier(table)} TO '{quoted}' {FORMATS[fmt]}")
            written.append(target)
    return written


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _file_name(name: str) -> str:
    """A table's name as a file name inside the folder: no separator, no leading dot, nothing else changed."""
    safe = name.replace("/", "%2F").replace("\\", "%5C").replace("\0", "%00")
    return "%2E" + safe[1:] if safe.startswith(".") else safe


def ledger_tables(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Every table the ledger holds, (schema, name), from DuckDB's catalog: a table added later, in any
    schema, is never left out."""
    rows = con.execute("SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = "
                       "current_database() AND NOT internal ORDER BY schema_name <> 'main', schema_name, "
                       "table_name").fetchall()
    return [(schema, name) for schema, name in rows]


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
        role = str(run.role) if run.attempt == 1 else f"{run.role} (attempt {run.attempt})"  # each attempt drawn
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
    events += _handoff_flows(ledger, batch_id, runs, origin)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"batch_id": batch_id}}


def _handoff_flows(ledger: Ledger, batch_id: str, runs: list[RunRecord], origin: dt.datetime) -> list[dict[str, Any]]:
    """A flow arrow per handoff: "s" on the giver's lane as it ended, "f" (bound to the enclosing slice,
    "bp": "e") on the receiver's lane as it started. Only between runs that have a slice on a lane."""
    by_id = {run.run_id: run for run in runs}
    flows: list[dict[str, Any]] = []
    for number, handed in enumerate(batch_handoffs(ledger, batch_id), start=1):
        giver, receiver = by_id.get(handed.from_run_id), by_id.get(handed.to_run_id)
        if giver is None or receiver is None or not (_on_lane(giver) and _on_lane(receiver)):
            continue
        assert giver.started_at and giver.finished_at and receiver.started_at
        # A flow start binds to the slice that encloses it: half a microsecond inside the giver's end (the
        # slice's end is a sum of floats; a whole microsecond could land past it or just outside "within 1").
        end = max(_micros(giver.started_at, origin), _micros(giver.finished_at, origin) - 0.5)
        common = {"name": "handoff", "cat": "handoff", "id": number, "pid": 1}
        flows.append({**common, "ph": "s", "tid": giver.worker_pid, "ts": end,
                      "args": {"token_id": handed.token_id, "output_digest": handed.output_digest}})
        flows.append({**common, "ph": "f", "bp": "e", "tid": receiver.worker_pid,
                      "ts": _micros(receiver.started_at, origin)})
    return flows


def _on_lane(run: RunRecord) -> bool:
    return run.started_at is not None and run.finished_at is not None and run.worker_pid is not None
