"""The only code that writes the ledger: group commit from one thread of the parent.

Callers (the executor, or ``Ledger``'s write methods) enqueue records and
return at once. One writer thread takes everything pending (``Pending``) and
writes it in one transaction with set-based statements (Arrow tables for
inserts, one ``UPDATE ... FROM`` for transitions). The same thread runs the
schema work and reads of its ``Ledger`` (``run``), so opening a ledger,
checking a batch id and the first commit share one attachment of the file
(see ``ledger_db``). The file stays open across back-to-back work for at most
``LEASE`` seconds and at most ``LINGER`` seconds idle, so readers in other
processes get their turn. A record reaches the file within about
``FLUSH_WINDOW`` plus one commit.

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
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from parroles import ledger_db
from parroles.errors import ImmutableRunError, LedgerError
from parroles.ledger_pending import NewRuns, Pending, arrow_column, arrow_table, present_columns
from parroles.ledger_schema import (
    JSON_COLUMNS,
    TIMESTAMP_COLUMNS,
    UPDATABLE,
    UUID_COLUMNS,
    migrate,
)
from parroles.owner import Owner
from parroles.records import TERMINAL, BatchState, Reason, RunStatus

if TYPE_CHECKING:
    import duckdb

FLUSH_WINDOW = 0.15
# A commit this many records large does not wait for the rest of its window.
FULL_COMMIT = 10_000
# Kept open while idle this long, so the commit that follows an open (or a
# read) within the flush window finds the file open.
LINGER = 0.2
_STATUS_TEXT = {status: status.value for status in RunStatus}
ACTIVE = ("QUEUED", "RUNNING")
T = TypeVar("T")


@dataclasses.dataclass
class _Commit:
    """Records taken for one transaction."""

    pending: Pending
    target: int  # the enqueue count it brings the file up to
    urgent: bool
    ended: list[str]  # runs it makes terminal


class LedgerWriter:
    """Queue of ledger records and the thread that commits them."""

    def __init__(self, path: str, busy_timeout: float = ledger_db.DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        # Data under _lock (entered directly on hot paths: a Condition's own
        # __enter__ is Python code); _cond signals the writer thread and flushers.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending = Pending()
        self._enqueued = 0
        self._committed = 0
        self._error: LedgerError | None = None
        self._urgent = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._calls: list[tuple[Callable[[Any], Any], Future[Any]]] = []
        self._lease = ledger_db.Lease(path, busy_timeout)
        # Runs whose status this writer must know to check transitions: every
        # non-terminal run it wrote, and terminal ones until they are committed.
        self._status: dict[str, RunStatus] = {}
        self._seq: dict[str, int] = {}
        self._ended: list[str] = []  # runs made terminal since the last commit began

    # -- opening ---------------------------------------------------------------------

    def open(self) -> list[str]:
        """Create or migrate the schema, reconcile orphaned batches; return their ids."""

        def prepare(con: duckdb.DuckDBPyConnection) -> list[str]:
            migrate(con, self.path)
            return _reconcile_orphans(con)

        return self.run(prepare)

    def run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``work`` on the writer's connection, in the writer thread, and return its result.

        It sees what is committed, not what is still pending.
        """
        future: Future[T] = Future()
        with self._lock:
            if self._closing:
                raise LedgerError(f"ledger {self.path} is closed")
            self._calls.append((work, future))
            self._start_thread_locked()
            self._cond.notify_all()
        return future.result()

    # -- enqueueing (any thread) ---------------------------------------------------------

    def start_batch(self, row: dict[str, Any], runs: NewRuns) -> None:
        """Insert a batch and its QUEUED runs, in one commit."""
        with self._lock:
            self._pending.batches[row["batch_id"]] = row
            self._add_runs_locked(runs)

    def start_runs(self, runs: NewRuns) -> None:
        """Insert QUEUED runs."""
        with self._lock:
            self._add_runs_locked(runs)

    def _add_runs_locked(self, runs: NewRuns) -> None:
        # dict.update walks these in C: a batch of 100,000 roles is recorded in ~10 ms.
        self._status.update(dict.fromkeys(runs.run_ids, RunStatus.QUEUED))
        self._seq.update(dict.fromkeys(runs.run_ids, 0))
        self._pending.add_runs(runs)
        self._enqueue_locked()

    def finish_batch(self, batch_id: str, state: BatchState, finished_at: float) -> None:
        with self._lock:
            cols = {"state": state.value, "finished_at": finished_at}
            Pending._merge(self._pending.batches, self._pending.batch_updates, batch_id, cols)
            self._enqueue_locked()

    def adopt(self, run_id: str, status: RunStatus, total_events: int) -> None:
        """Teach the writer the state of a run it did not create (read from the file)."""
        with self._lock:
            if run_id not in self._status:
                self._status[run_id] = status
                self._seq[run_id] = total_events
                self._start_thread_locked()

    def knows(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._status

    def transition(self, run_id: str, status: RunStatus, **columns: Any) -> None:
        """Move a run to ``status``, setting ``columns`` too. Terminal runs refuse."""
        # The executor calls this twice per role: kept lean on purpose.
        with self._lock:
            current = self._status.get(run_id)
            if current is None or current in TERMINAL:
                self._refuse(run_id, current, status)
            self._status[run_id] = status
            columns["status"] = _STATUS_TEXT[status]
            if status in TERMINAL:
                columns["total_events"] = self._seq[run_id]
                columns["success"] = status is RunStatus.COMPLETED
                self._ended.append(run_id)
            # A run not inserted yet is updated right after its insert, in the same transaction.
            updates = self._pending.run_updates
            if (update := updates.get(run_id)) is not None:
                update.update(columns)
            else:
                updates[run_id] = columns
            self._enqueued += 1
            if self._enqueued - self._committed == 1:
                self._cond.notify_all()

    @staticmethod
    def _refuse(run_id: str, current: RunStatus | None, status: RunStatus) -> None:
        if current is None:
            raise LedgerError(f"run {run_id} is not known to this ledger writer")
        raise ImmutableRunError(f"run {run_id} is already {current.value}; it cannot become {status.value}")

    def add_event(self, run_id: str, kind: str, payload_json: str | None, ts: float) -> int:
        """Append an event to an active run; returns its seq (1, 2, 3, ... per run)."""
        with self._lock:
            current = self._status_locked(run_id)
            if current.terminal:
                raise ImmutableRunError(f"run {run_id} is {current.value}; it takes no more events")
            seq = self._seq[run_id] = self._seq[run_id] + 1
            self._pending.events.append((run_id, seq, kind, payload_json, ts))
            self._enqueue_locked()
            return seq

    def _start_thread_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._commit_loop, name="parroles-ledger-writer", daemon=True)
            self._thread.start()

    def _status_locked(self, run_id: str) -> RunStatus:
        try:
            return self._status[run_id]
        except KeyError:
            raise LedgerError(f"run {run_id} is not known to this ledger writer") from None

    def _enqueue_locked(self) -> None:
        self._enqueued += 1
        self._start_thread_locked()
        if self._enqueued - self._committed == 1:
            # Wake the writer when it may be idle; waking it on every record costs the GIL.
            self._cond.notify_all()

    # -- flushing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Block until everything enqueued so far is committed; raise LedgerError if it cannot be."""
        with self._lock:
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
            with self._lock:
                self._closing = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def _commit_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    work = self._next_work_locked()
                if work is None:
                    return
                if isinstance(work, _Commit):
                    if not self._commit(work):
                        return
                elif work:
                    self._run_calls(work)
                else:
                    self._lease.release()  # idle for LINGER: the readers' turn
        finally:
            self._lease.release()
            with self._lock:
                calls, self._calls = self._calls, []
            for _, future in calls:
                future.set_exception(LedgerError(f"ledger {self.path} is closed"))

    def _next_work_locked(self) -> _Commit | list[tuple[Callable[[Any], Any], Future[Any]]] | None:
        """Calls to run, records to commit, [] when idle for LINGER, None when closing with nothing left."""
        while not self._calls and not (self._pending and (self._error is None or self._urgent)):
            if self._closing:
                return None if not self._pending else self._take_locked()
            if not self._cond.wait(LINGER if self._lease.held else None) and self._lease.held:
                return []
        if self._calls:
            calls, self._calls = self._calls, []
            return calls
        # Group commit: let records that arrive meanwhile join this one, unless
        # it is big enough already that waiting would add latency and save nothing.
        window_ends = time.monotonic() + FLUSH_WINDOW
        while not (self._urgent or self._closing or self._calls or self._pending.size() >= FULL_COMMIT) and (
            left := window_ends - time.monotonic()
        ) > 0:
            self._cond.wait(left)
        return self._take_locked()

    def _take_locked(self) -> _Commit:
        commit = _Commit(self._pending, self._enqueued, self._urgent, self._ended)
        self._pending, self._urgent, self._ended = Pending(), False, []
        return commit

    def _run_calls(self, calls: list[tuple[Callable[[Any], Any], Future[Any]]]) -> None:
        for work, future in calls:
            try:
                con = self._lease.connection(urgent=True)
                with ledger_db.translating(self.path):
                    future.set_result(work(con))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on the future
                self._lease.release()
                future.set_exception(exc)
        self._lease.release_if_due()

    def _commit(self, commit: _Commit) -> bool:
        """Write one group commit; False when the writer is to stop after a failure at closing."""
        try:
            self._write(commit.pending, commit.urgent)
        except Exception as exc:  # noqa: BLE001 - kept and raised from flush()
            self._lease.release()
            error = exc if isinstance(exc, LedgerError) else LedgerError(f"ledger {self.path}: {exc}")
            error.__cause__ = error.__cause__ or exc
            with self._lock:
                commit.pending.absorb(self._pending)
                self._pending, self._error = commit.pending, error
                self._ended = commit.ended + self._ended
                self._cond.notify_all()
                return not self._closing
        with self._lock:
            self._committed, self._error = commit.target, None
            for run_id in commit.ended:  # committed as terminal: the file has the final word now
                del self._status[run_id], self._seq[run_id]
            self._cond.notify_all()
        self._lease.release_if_due()
        return True

    def _write(self, pending: Pending, urgent: bool) -> None:
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


# -- SQL -------------------------------------------------------------------------------


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


def _write_batches(con: duckdb.DuckDBPyConnection, pending: Pending) -> None:
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


# What a new run gets for a column its row does not carry; derived columns are
# computed here rather than per row in Python.
def _write_runs(con: duckdb.DuckDBPyConnection, pending: Pending) -> None:
    for runs in pending.new_runs:  # inserted first: the updates below may be theirs
        _insert_runs(con, runs)
    if pending.run_updates:
        rows = list(pending.run_updates.values())
        present = present_columns(rows)
        names = [name for name in UPDATABLE if name in present]
        if all(len(row) == len(names) for row in rows):  # every row sets every column: no coalesce needed
            assignments = ", ".join(f"{n} = {_column_sql(n, 'u')}" for n in names)
        else:
            assignments = ", ".join(f"{n} = coalesce({_column_sql(n, 'u')}, runs.{n})" for n in names)
        table = arrow_table(rows, names).append_column("run_id", arrow_column(list(pending.run_updates), "run_id"))
        con.register("run_updates", table)
        (changed,) = con.execute(  # type: ignore[misc]
            f"UPDATE runs SET {assignments} FROM run_updates u WHERE runs.run_id = CAST(u.run_id AS UUID)"
            f" AND runs.status IN {ACTIVE}").fetchone()
        con.unregister("run_updates")
        if changed != len(rows):
            raise ImmutableRunError(
                f"{len(rows) - changed} of {len(rows)} run transitions found their run missing or already terminal"
            )


def _insert_runs(con: duckdb.DuckDBPyConnection, runs: NewRuns) -> None:
    import pyarrow as pa

    columns = {"run_id": runs.run_ids, "position": runs.positions, "role": runs.roles}
    table = pa.table({name: arrow_column(values, name) for name, values in columns.items()})
    con.register("new_runs", table)
    con.execute(
        "INSERT INTO runs (run_id, parent_run_id, position, role, status, spec_digest, agent_name, git_sha, tags,"
        " queued_at, total_events, attempt)"
        " SELECT CAST(r.run_id AS UUID), $parent, r.position, r.role, 'QUEUED', $digest, 'role:' || r.role, $sha,"
        " json_object('parent_run_id', $parent, 'role', r.role), to_timestamp($queued), 0, 1 FROM new_runs r",
        {"parent": runs.parent_run_id, "digest": runs.spec_digest, "sha": runs.git_sha, "queued": runs.queued_at},
    )
    con.unregister("new_runs")


def _write_events(con: duckdb.DuckDBPyConnection, pending: Pending) -> None:
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
        "INSERT INTO events"
        " SELECT CAST(run_id AS UUID), seq, kind, CAST(payload AS JSON), to_timestamp(ts) FROM new_events"
    )
    con.unregister("new_events")

