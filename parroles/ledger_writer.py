"""The only code that writes the ledger: group commit from one thread of the parent.

Callers (the executor, or ``Ledger``'s write methods) enqueue records and
return at once. One writer thread takes everything pending, opens the file,
writes it in one transaction with set-based statements (Arrow tables for
inserts, one ``UPDATE ... FROM`` for transitions), commits and closes the
file again, so readers in other processes get their turn between commits.
A record reaches the file within about ``FLUSH_WINDOW`` plus one commit.

Transitions are checked when they are enqueued: a terminal run refuses a
second transition or an event (``ImmutableRunError``), and the ``UPDATE``
re-checks it in SQL. A failed commit keeps its records queued and raises
from ``flush()``; nothing is dropped and nothing is invented.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from parroles import ledger_db
from parroles.errors import ImmutableRunError, LedgerError
from parroles.ledger_schema import (
    JSON_COLUMNS,
    MIGRATIONS,
    RUN_COLUMNS,
    SCHEMA_VERSION,
    TIMESTAMP_COLUMNS,
    UPDATABLE,
    UUID_COLUMNS,
)
from parroles.owner import Owner
from parroles.records import BatchState, Reason, RunStatus

if TYPE_CHECKING:
    import duckdb
    import pyarrow

FLUSH_WINDOW = 0.15
# While records keep coming, the writer keeps the file open across commits for
# up to LEASE seconds, then leaves it closed for at least GAP seconds so that
# readers in other processes get their turn; it never holds the file while idle.
LEASE = 0.5
GAP = 0.15
ACTIVE = ("QUEUED", "RUNNING")


@dataclasses.dataclass
class _Pending:
    """Records not yet committed, coalesced per run."""

    batches: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    batch_updates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    new_runs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    run_updates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    events: list[tuple[str, int, str, str | None, float]] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.batches or self.batch_updates or self.new_runs or self.run_updates or self.events)

    def absorb(self, later: _Pending) -> None:
        """Put ``later`` behind this one (used to requeue a failed commit)."""
        self.batches.update(later.batches)
        for key, cols in later.batch_updates.items():
            self._merge(self.batches, self.batch_updates, key, cols)
        self.new_runs.update(later.new_runs)
        for key, cols in later.run_updates.items():
            self._merge(self.new_runs, self.run_updates, key, cols)
        self.events.extend(later.events)

    @staticmethod
    def _merge(new: dict[str, dict[str, Any]], updates: dict[str, dict[str, Any]], key: str, cols: Mapping[str, Any]) -> None:
        if key in new:
            new[key].update(cols)
        else:
            updates.setdefault(key, {}).update(cols)


class LedgerWriter:
    """Queue of ledger records and the thread that commits them."""

    def __init__(self, path: str, busy_timeout: float = ledger_db.DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._cond = threading.Condition()
        self._pending = _Pending()
        self._enqueued = 0
        self._committed = 0
        self._error: LedgerError | None = None
        self._urgent = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lease = _Lease(path, busy_timeout)
        # Runs whose status this writer must know to check transitions: every
        # non-terminal run it wrote, and terminal ones until they are committed.
        self._status: dict[str, RunStatus] = {}
        self._seq: dict[str, int] = {}

    # -- opening ---------------------------------------------------------------------

    def open(self) -> list[str]:
        """Create or migrate the schema, reconcile orphaned batches; return their ids."""
        with ledger_db.connect(self.path, read_only=False, busy_timeout=self.busy_timeout) as con:
            _migrate(con, self.path)
            return _reconcile_orphans(con)

    # -- enqueueing (any thread) ---------------------------------------------------------

    def start_batch(self, row: dict[str, Any], runs: Iterable[dict[str, Any]]) -> None:
        with self._cond:
            self._pending.batches[row["batch_id"]] = row
            self.start_runs(runs)

    def start_runs(self, runs: Iterable[dict[str, Any]]) -> None:
        """Insert QUEUED runs (rows made by ``new_run_row``)."""
        with self._cond:
            for run in runs:
                self._status[run["run_id"]] = RunStatus.QUEUED
                self._seq[run["run_id"]] = 0
                self._pending.new_runs[run["run_id"]] = run
            self._enqueue_locked()

    def finish_batch(self, batch_id: str, state: BatchState, finished_at: float) -> None:
        with self._cond:
            cols = {"state": state.value, "finished_at": finished_at}
            _Pending._merge(self._pending.batches, self._pending.batch_updates, batch_id, cols)
            self._enqueue_locked()

    def adopt(self, run_id: str, status: RunStatus, total_events: int) -> None:
        """Teach the writer the state of a run it did not create (read from the file)."""
        with self._cond:
            if run_id not in self._status:
                self._status[run_id] = status
                self._seq[run_id] = total_events

    def knows(self, run_id: str) -> bool:
        with self._cond:
            return run_id in self._status

    def transition(self, run_id: str, status: RunStatus, **columns: Any) -> None:
        """Move a run to ``status``, setting ``columns`` too. Terminal runs refuse."""
        with self._cond:
            current = self._status_locked(run_id)
            if current.terminal:
                raise ImmutableRunError(f"run {run_id} is already {current.value}; it cannot become {status.value}")
            self._status[run_id] = status
            cols = {**columns, "status": status.value}
            if status.terminal:
                cols["total_events"] = self._seq[run_id]
                cols["success"] = status is RunStatus.COMPLETED
            _Pending._merge(self._pending.new_runs, self._pending.run_updates, run_id, cols)
            self._enqueue_locked()

    def add_event(self, run_id: str, kind: str, payload_json: str | None, ts: float) -> int:
        """Append an event to an active run; returns its seq (1, 2, 3, ... per run)."""
        with self._cond:
            current = self._status_locked(run_id)
            if current.terminal:
                raise ImmutableRunError(f"run {run_id} is {current.value}; it takes no more events")
            seq = self._seq[run_id] = self._seq[run_id] + 1
            self._pending.events.append((run_id, seq, kind, payload_json, ts))
            self._enqueue_locked()
            return seq

    def _status_locked(self, run_id: str) -> RunStatus:
        try:
            return self._status[run_id]
        except KeyError:
            raise LedgerError(f"run {run_id} is not known to this ledger writer") from None

    def _enqueue_locked(self) -> None:
        self._enqueued += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._commit_loop, name="parroles-ledger-writer", daemon=True)
            self._thread.start()
        if self._enqueued == self._committed + 1 or self._enqueued % 256 == 0:
            # Wake the writer when it may be idle; waking it on every record costs the GIL.
            self._cond.notify_all()

    # -- flushing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Block until everything enqueued so far is committed; raise LedgerError if it cannot be."""
        with self._cond:
            target = self._enqueued
            failed_before = self._error
            self._urgent = True
            self._cond.notify_all()
            while self._committed < target:
                if self._error is not None and self._error is not failed_before:
                    raise self._error
                if self._thread is None or not self._thread.is_alive():
                    raise LedgerError("the ledger writer thread is not running")
                self._cond.wait()

    def close(self) -> None:
        """Flush, then stop the writer thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending and (self._error is None or self._urgent)) and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    return
                # Group commit: let records that arrive meanwhile join this one.
                window_ends = time.monotonic() + FLUSH_WINDOW
                while not self._urgent and not self._closing and (left := window_ends - time.monotonic()) > 0:
                    self._cond.wait(left)
                pending, target, urgent = self._pending, self._enqueued, self._urgent
                self._pending, self._urgent = _Pending(), False
            try:
                self._write(pending, urgent)
            except Exception as exc:  # noqa: BLE001 - kept and raised from flush()
                self._lease.release()
                error = exc if isinstance(exc, LedgerError) else LedgerError(f"ledger {self.path}: {exc}")
                error.__cause__ = error.__cause__ or exc
                with self._cond:
                    pending.absorb(self._pending)
                    self._pending, self._error = pending, error
                    self._cond.notify_all()
                    if self._closing:
                        return
                continue
            with self._cond:
                self._committed, self._error = target, None
                self._forget_committed_terminal(pending)
                self._cond.notify_all()
                idle = not self._pending
            self._lease.release_if_due(idle)

    def _forget_committed_terminal(self, pending: _Pending) -> None:
        for run_id in (*pending.new_runs, *pending.run_updates):
            status = self._status.get(run_id)
            if status is not None and status.terminal:
                del self._status[run_id]
                del self._seq[run_id]

    def _write(self, pending: _Pending, urgent: bool) -> None:
        con = self._lease.connection(urgent)
        with ledger_db.translating(self.path):
            con.begin()
            try:
                _write_batches(con, pending)
                _write_runs(con, pending)
                _write_events(con, pending)
                con.commit()
            except BaseException:
                con.rollback()
                raise


def new_run_row(run_id: str, parent_run_id: str, position: int, role: str, spec_digest: str | None,
                git_sha: str | None, queued_at: float) -> dict[str, Any]:
    """The ``runs`` row of a QUEUED run, tagged as the seed tags it."""
    tags = json.dumps({"parent_run_id": parent_run_id, "role": role}, sort_keys=True)
    return {"run_id": run_id, "parent_run_id": parent_run_id, "position": position, "role": role,
            "status": RunStatus.QUEUED.value, "spec_digest": spec_digest, "agent_name": f"role:{role}",
            "git_sha": git_sha, "tags": tags, "queued_at": queued_at, "attempt": 1, "total_events": 0}


class _Lease:
    """The writer's connection: kept across back-to-back commits, never while idle."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._con: duckdb.DuckDBPyConnection | None = None
        self._opened = 0.0
        self._closed = -GAP

    def connection(self, urgent: bool) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            wait = self._closed + GAP - time.monotonic()
            if wait > 0 and not urgent:
                time.sleep(wait)  # the readers' turn: a gap after a full lease
            self._con = ledger_db.open_connection(self.path, read_only=False, busy_timeout=self.busy_timeout)
            self._opened = time.monotonic()
        return self._con

    def release_if_due(self, idle: bool) -> None:
        if self._con is not None and (idle or time.monotonic() - self._opened > LEASE):
            self.release(gap=not idle)

    def release(self, gap: bool = False) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            ledger_db.close_connection(self.path, con)
            self._closed = time.monotonic() if gap else -GAP


# -- SQL -------------------------------------------------------------------------------


def _migrate(con: duckdb.DuckDBPyConnection, path: str) -> None:
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL)")
    (version,) = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()  # type: ignore[misc]
    if version > SCHEMA_VERSION:
        raise LedgerError(f"{path} was written by a newer parroles (schema {version} > {SCHEMA_VERSION}); upgrade parroles")
    for number in range(version + 1, SCHEMA_VERSION + 1):
        con.begin()
        con.execute(MIGRATIONS[number - 1])
        con.execute("INSERT INTO schema_version VALUES (?, now())", [number])
        con.commit()


def _reconcile_orphans(con: duckdb.DuckDBPyConnection) -> list[str]:
    """End the runs of batches whose parent process died (found on this host only)."""
    rows = con.execute(
        "SELECT batch_id, owner_host, owner_pid, owner_started FROM batches WHERE state = ?", [BatchState.RUNNING.value]
    ).fetchall()
    dead = [batch_id for batch_id, host, pid, started in rows if Owner(host, pid, started).is_alive() is False]
    if not dead:
        return []
    error = json.dumps({"type": "parroles.Orphaned", "message": "parent process died", "traceback": ""})
    con.begin()
    for new_status, extra in ((RunStatus.FAILED, error), (RunStatus.CANCELLED, None)):
        old = RunStatus.RUNNING if new_status is RunStatus.FAILED else RunStatus.QUEUED
        con.execute(
            "UPDATE runs SET status = ?, reason = ?, error = coalesce(?::JSON, error), success = false, "
            "finished_at = now(), total_events = (SELECT count(*) FROM events e WHERE e.run_id = runs.run_id) "
            "WHERE parent_run_id IN (SELECT unnest(?)) AND status = ?",
            [new_status.value, Reason.ORPHANED.value, extra, dead, old.value],
        )
    con.execute(
        "UPDATE batches SET state = ?, finished_at = now() WHERE batch_id IN (SELECT unnest(?))",
        [BatchState.CRASHED.value, dead],
    )
    con.commit()
    return dead


_BATCH_COLUMNS = ("batch_id", "name", "spec_digest", "config", "state", "started_at", "finished_at",
                  "n_roles", "owner_host", "owner_pid", "owner_started")


def _write_batches(con: duckdb.DuckDBPyConnection, pending: _Pending) -> None:
    for row in pending.batches.values():
        values = [row.get(name) for name in _BATCH_COLUMNS]
        con.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?::JSON, ?, to_timestamp(?), to_timestamp(?), ?, ?, ?, ?)", values
        )
    for batch_id, cols in pending.batch_updates.items():
        con.execute(
            "UPDATE batches SET state = ?, finished_at = to_timestamp(?) WHERE batch_id = ?",
            [cols["state"], cols["finished_at"], batch_id],
        )


def _column_sql(name: str, source: str) -> str:
    if name in TIMESTAMP_COLUMNS:
        return f"to_timestamp({source}.{name})"
    if name in UUID_COLUMNS:
        return f"CAST({source}.{name} AS UUID)"
    if name in JSON_COLUMNS:
        return f"CAST({source}.{name} AS JSON)"
    return f"{source}.{name}"


_INSERT_RUNS = "INSERT INTO runs SELECT " + ", ".join(_column_sql(n, "r") for n, _ in RUN_COLUMNS) + " FROM new_runs r"
_UPDATE_RUNS = (
    "UPDATE runs SET "
    + ", ".join(f"{n} = coalesce({_column_sql(n, 'u')}, runs.{n})" for n in UPDATABLE)
    + " FROM run_updates u WHERE runs.run_id = CAST(u.run_id AS UUID)"
    + f" AND runs.status IN {ACTIVE}"
)


def _arrow(rows: Iterable[Mapping[str, Any]], columns: Iterable[tuple[str, str]]) -> pyarrow.Table:
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
    rows = list(rows)
    return pa.table({name: pa.array([row.get(name) for row in rows], type=types[kind]) for name, kind in columns})


def _write_runs(con: duckdb.DuckDBPyConnection, pending: _Pending) -> None:
    if pending.new_runs:
        con.register("new_runs", _arrow(pending.new_runs.values(), RUN_COLUMNS))
        con.execute(_INSERT_RUNS)
        con.unregister("new_runs")
    if pending.run_updates:
        rows = [{"run_id": run_id, **cols} for run_id, cols in pending.run_updates.items()]
        columns = [c for c in RUN_COLUMNS if c[0] == "run_id" or c[0] in UPDATABLE]
        con.register("run_updates", _arrow(rows, columns))
        (changed,) = con.execute(_UPDATE_RUNS).fetchone()  # type: ignore[misc]
        con.unregister("run_updates")
        if changed != len(rows):
            raise ImmutableRunError(
                f"{len(rows) - changed} of {len(rows)} run transitions found their run missing or already terminal"
            )


def _write_events(con: duckdb.DuckDBPyConnection, pending: _Pending) -> None:
    if not pending.events:
        return
    import pyarrow as pa

    run_ids, seqs, kinds, payloads, stamps = zip(*pending.events)
    table = pa.table(
        {
            "run_id": pa.array(run_ids, pa.string()),
            "seq": pa.array(seqs, pa.int64()),
            "kind": pa.array(kinds, pa.string()),
            "payload": pa.array(payloads, pa.string()),
            "ts": pa.array(stamps, pa.float64()),
        }
    )
    con.register("new_events", table)
    con.execute(
        "INSERT INTO events SELECT CAST(run_id AS UUID), seq, kind, CAST(payload AS JSON), to_timestamp(ts) FROM new_events"
    )
    con.unregister("new_events")

