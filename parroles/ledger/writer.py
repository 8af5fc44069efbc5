"""The one writer of the ledger: a thread of the parent that journals, then group-commits.

Callers enqueue records and return at once. The thread takes everything
pending, appends it to its journal (``journal``), then commits every
journaled record in one transaction (``commit``) and empties the journal. It
also runs the schema work and a writable ``Ledger``'s reads (``run``), so they
share one attachment of the file (``db``), held across back-to-back work for
at most ``LEASE`` seconds and ``LINGER`` seconds idle, so readers get their
turn. A record reaches the file within about ``FLUSH_WINDOW`` plus a commit.

A failed commit (a busy file, a full disk) keeps its records journaled and in
memory; the thread retries with backoff while the writer is open, and never
dies of an error. ``flush(wait)`` waits at most ``wait`` seconds, then returns
how many records are left in the journal (fsync'ed), or raises ``LedgerError``
when they could be neither committed nor journaled. A terminal run refuses a
second transition or an event when it is enqueued (``ImmutableRunError``), and
the ``UPDATE`` checks it again. Nothing is dropped and nothing is invented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from parroles.errors import LedgerError
from parroles.ledger import db as ledger_db
from parroles.ledger import journal as ledger_journal
from parroles.ledger.commit import Opened, prepare, write_records
from parroles.ledger.known_runs import KnownRuns
from parroles.ledger.pending import NewRuns, Pending
from parroles.results import TERMINAL, BatchState, RunStatus

if TYPE_CHECKING:
    import duckdb

FLUSH_WINDOW = 0.15
# A commit this many records large does not wait for the rest of its window.
FULL_COMMIT = 10_000
# Kept open while idle this long, so the commit that follows an open (or a
# read) within the flush window finds the file open.
LINGER = 0.2
# A commit waits this long for another process's lock, then the thread
# retries after a backoff that doubles up to RETRY_MAX (journaling what
# arrives meanwhile), so a busy file never stalls the writer.
COMMIT_WAIT = 0.1
RETRY_FIRST = 0.05
START_WAIT = 1.0  # seconds closing waits for a writer thread whose start a signal interrupted
RETRY_MAX = 1.0
# How long a flush that gave up on the commit waits for the thread to journal
# the last records (it never waits on the file, only on its own work).
JOURNAL_WAIT = 30.0
_STATUS_TEXT = {status: status.value for status in RunStatus}
T = TypeVar("T")


class _Step(enum.Enum):
    """What the writer thread does next."""

    CALLS = "calls"  # run work handed to ``run``
    WRITE = "write"  # journal what is pending, and commit when no backoff says wait
    IDLE = "idle"  # nothing for LINGER: close the file, the readers' turn
    STOP = "stop"  # closing, nothing left


@dataclasses.dataclass
class _Taken:
    """Records the thread has taken (journaled, or kept in memory when the journal failed), not committed."""

    pending: Pending = dataclasses.field(default_factory=Pending)
    target: int = 0  # the enqueue count they bring the file up to
    ended: list[str] = dataclasses.field(default_factory=list)  # runs they make terminal


class LedgerWriter:
    """Queue of ledger records and the thread that journals and commits them."""

    def __init__(self, path: str, busy_timeout: float = ledger_db.DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        # Data under _lock (entered directly on hot paths: a Condition's own
        # __enter__ is Python code); _cond signals the writer thread and flushers.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending = Pending()
        self._enqueued = 0
        self._taken_upto = 0  # enqueue count the thread has taken (to journal and commit)
        self._journaled = 0  # enqueue count that is in the journal (or committed)
        self._committed = 0
        self._taken_rows = 0  # rows taken and not committed, counted as the journal counts them
        self._error: LedgerError | None = None  # why the last commit failed, until one succeeds
        self._retry_at = 0.0  # monotonic time of the next commit try after a failure
        self._backoff = RETRY_FIRST
        self._urgent = False
        self._window_ends: float | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._running = threading.Event()  # set by the thread itself: it did start
        self._calls: list[tuple[Callable[[Any], Any], Future[Any]]] = []
        self._stop = threading.Event()  # set by close: no more waiting for the file
        self._lease = ledger_db.Lease(path, busy_timeout, self._stop)
        self._journal = ledger_journal.Journal(path)
        self._taken = _Taken()  # the writer thread's own
        self._known = KnownRuns()
        self._status, self._seq = self._known.status, self._known.seq  # the hot paths' own names
        self._ended: list[str] = []  # runs made terminal since the thread last took records

    # -- opening ---------------------------------------------------------------------

    def open(self) -> Opened:
        """Check and migrate the file, apply journals left by writers that are gone, reconcile orphaned batches."""
        return self.run(lambda con: prepare(con, self.path))

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
        self._known.add_queued(runs.run_ids)
        self._pending.add_runs(runs)
        self._enqueue_locked()

    def finish_batch(self, batch_id: str, state: BatchState, finished_at: float) -> None:
        with self._lock:
            cols = {"state": state.value, "finished_at": finished_at}
            self._pending.update_batch(batch_id, cols)
            self._enqueue_locked()

    def adopt(self, run_id: str, status: RunStatus, total_events: int) -> None:
        """Teach the writer the state of a run it did not create (read from the file)."""
        with self._lock:
            if self._known.adopt(run_id, status, total_events):
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
                self._known.refuse(run_id, current, status)
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
            if self._enqueued - self._taken_upto == 1:
                self._cond.notify_all()

    def add_event(self, run_id: str, kind: str, payload_json: str | None, ts: float) -> int:
        """Append an event to an active run; returns its seq (1, 2, 3, ... per run)."""
        with self._lock:
            self._known.active(run_id)
            seq = self._seq[run_id] = self._seq[run_id] + 1
            self._pending.events.append((run_id, seq, kind, payload_json, ts))
            self._enqueue_locked()
            return seq

    def add_handoffs(self, rows: list[tuple[str, str, str, str, float]]) -> None:
        """Record edges handed over: (token_id, from_run_id, to_run_id, output_digest, created_at)."""
        self._add_rows("handoffs", rows)

    def add_logs(self, rows: list[tuple[str, int, str, str, float]]) -> None:
        """Record output lines: (run_id, seq, stream, line, ts)."""
        self._add_rows("logs", rows)

    def _add_rows(self, table: str, rows: list[Any]) -> None:
        with self._lock:
            getattr(self._pending, table).extend(rows)
            self._enqueue_locked()

    def _start_thread_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer_thread, name="parroles-ledger-writer", daemon=True)
            self._thread.start()

    def _enqueue_locked(self) -> None:
        self._enqueued += 1
        self._start_thread_locked()
        if self._enqueued - self._taken_upto == 1:
            # Wake the writer when it may be idle; waking it on every record costs the GIL.
            self._cond.notify_all()

    # -- flushing ----------------------------------------------------------------------

    def flush(self, wait: float | None = None) -> int:
        """Wait up to ``wait`` seconds (default: ``busy_timeout``) until everything enqueued is committed.

        Returns 0 once it is; otherwise the number of records left in the
        journal, fsync'ed, for this writer's later commits or the next open.
        Raises ``LedgerError`` (its cause chained) when records could be
        neither committed nor journaled.
        """
        deadline = time.monotonic() + (self.busy_timeout if wait is None else wait)
        with self._lock:
            target = self._enqueued
            if self._committed >= target:
                return 0
            self._urgent = True
            self._cond.notify_all()
            self._wait_locked(lambda: self._committed >= target, deadline)
            if self._committed >= target:
                return 0
            # The thread takes what is pending without waiting on the file; this waits only on its own work.
            self._wait_locked(lambda: self._taken_upto >= target, time.monotonic() + JOURNAL_WAIT)
            left, journaled = self._taken_rows, self._journaled >= target
        self._journal.sync()
        if journaled and self._journal.error is None:
            return left
        raise ledger_db.unrecorded(self.path, left, self._error, self._journal.error)

    def _wait_locked(self, done: Callable[[], bool], deadline: float) -> None:
        while not done() and (left := deadline - time.monotonic()) > 0:
            if self._thread is None or not self._thread.is_alive():
                return
            self._cond.wait(left)

    def close(self, wait: float | None = None) -> int:
        """Flush (see ``flush``), then stop the writer thread; returns the records left in the journal."""
        try:
            return self.flush(wait)
        finally:
            with self._lock:
                self._closing = True
                self._cond.notify_all()
            self._stop.set()
            if self._thread is not None:
                self._join_thread(self._thread)
                self._thread = None
            self._journal.close()

    def _join_thread(self, thread: threading.Thread) -> None:
        try:
            thread.join()
        except RuntimeError:  # a signal cut its Thread.start() short: it may be starting all the same
            if self._running.wait(START_WAIT):
                thread.join()  # it runs (perhaps in DuckDB's native code): let it finish, never exit under it

    # -- the writer thread -----------------------------------------------------------------

    def _writer_thread(self) -> None:
        self._running.set()
        while True:
            with self._lock:
                step = self._next_step_locked()
            if step is _Step.STOP:
                break
            try:
                if step is _Step.CALLS:
                    self._run_calls()
                elif step is _Step.IDLE:
                    self._lease.release()
                else:
                    self._write_step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any error; flush() reports it
                self._commit_failed(exc)
        with contextlib.suppress(Exception):
            self._lease.release()
        with self._lock:
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.set_exception(LedgerError(f"ledger {self.path} is closed"))

    def _next_step_locked(self) -> _Step:
        while True:
            if self._calls:
                return _Step.CALLS
            now = time.monotonic()
            if self._pending:
                if self._window_ends is None:
                    # Group commit: let records that arrive meanwhile join this one.
                    self._window_ends = now + FLUSH_WINDOW
                if (self._urgent or self._closing or self._window_ends <= now
                        or self._pending.size() >= FULL_COMMIT):
                    return _Step.WRITE
            if self._taken.pending and self._retry_at <= now and not self._closing:
                return _Step.WRITE
            if self._closing and not self._pending:
                return _Step.STOP
            deadlines = [d for d in (self._window_ends if self._pending else None,
                                     self._retry_at if self._taken.pending else None) if d is not None]
            timeout = max(0.0, min(deadlines) - now) if deadlines else (LINGER if self._lease.held else None)
            if not self._cond.wait(timeout) and not deadlines and self._lease.held:
                return _Step.IDLE

    def _write_step(self) -> None:
        """Journal what is pending; commit everything journaled unless a backoff says wait."""
        with self._lock:
            fresh, target, urgent = self._pending, self._enqueued, self._urgent
            ended, self._ended = self._ended, []
            self._pending, self._urgent, self._window_ends = Pending(), False, None
        if fresh:
            journaled = self._journal.append_records(fresh)
            taken = self._taken
            if taken.pending:
                taken.pending.absorb(fresh)
            else:
                taken.pending = fresh
            taken.target, taken.ended = target, taken.ended + ended
            with self._lock:
                self._taken_rows += fresh.rows()
                self._taken_upto = target
                if journaled and self._journal.durable:  # durable: no earlier entry is missing from it
                    self._journaled = target
                self._cond.notify_all()
        if self._retry_at > time.monotonic() and not self._closing:
            return  # journaled; the commit waits for its retry
        self._commit(urgent)

    def _commit(self, urgent: bool) -> None:
        taken = self._taken
        con = self._lease.connection(urgent, wait=COMMIT_WAIT)
        write_records(con, self.path, taken.pending)
        self._journal.clear()
        self._taken = _Taken()
        with self._lock:
            self._committed = self._journaled = max(self._journaled, taken.target)
            self._taken_upto = max(self._taken_upto, taken.target)
            self._taken_rows = 0
            self._error, self._retry_at, self._backoff = None, 0.0, RETRY_FIRST
            self._known.forget(taken.ended)  # committed as terminal: the file has the final word now
            self._cond.notify_all()
        self._lease.release_if_due()

    def _commit_failed(self, exc: Exception) -> None:
        error = exc if isinstance(exc, LedgerError) else LedgerError(f"ledger {self.path}: {ledger_db.first_line(exc)}")
        if error is not exc:
            error.__cause__ = exc
        try:
            self._lease.release()
        except Exception as cleanup:  # noqa: BLE001 - never hides the error that brought us here
            error.add_note(f"and closing the file failed too: {ledger_db.first_line(cleanup)}")
        with self._lock:
            self._error = error
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            self._cond.notify_all()

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for work, future in calls:
            try:
                con = self._lease.connection(urgent=True)
                with ledger_db.translating(self.path):
                    future.set_result(work(con))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on the future
                with contextlib.suppress(Exception):  # the caller gets ``exc``, not a cleanup error
                    self._lease.release()
                future.set_exception(exc)
        self._lease.release_if_due()

