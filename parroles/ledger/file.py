"""``Ledger``: the DuckDB file of batches, runs and events, and how to read it.

Reading is done here; every write goes through ``ledger.writer.LedgerWriter``.
A ``Ledger`` opened for writing creates the file (and its folders), refuses a
damaged file, brings the schema up to date, applies the journals of writers
that are gone (``ledger_journal``) and then reconciles batches whose parent
process died. Readers see what is committed; ``apply_journals`` lets them
apply what is journaled first, when the file can be taken for a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from parroles.digests import canonical_json, validate_digest
from parroles.errors import ConfigError, JournalDamagedWarning, LedgerError, LedgerPendingWarning, RunNotFoundError
from parroles.ledger import db as ledger_db
from parroles.ledger import journal as ledger_journal
from parroles.ledger.pending import NewRuns
from parroles.ledger.schema import SCHEMA_VERSION
from parroles.ledger.writer import LedgerWriter
from parroles.results import (
    BatchRecord,
    BatchState,
    Cost,
    ErrorInfo,
    LogLine,
    Reason,
    RunEvent,
    RunRecord,
    RunStatus,
    RunSummary,
)
from parroles.roles import RoleName, as_role, output_from_json, role_name

AMBIGUOUS_SHOWN = 5  # candidates an ambiguous id prefix lists

# What a RunRecord is read from: its fields by the column (or expression) that holds each.
_RUN_FIELDS = {
    "run_id": "run_id::VARCHAR", "spec_digest": "spec_digest", "git_sha": "git_sha", "agent_name": "agent_name",
    "tags": "tags::VARCHAR", "status": "status", "total_events": "total_events",
    "final_state_digest": "final_state_digest", "duration_ms": "duration_ms", "success": "success",
    "queued_at": "queued_at", "started_at": "started_at", "finished_at": "finished_at",
    "parent_run_id": "parent_run_id", "role": "role", "output": "output::VARCHAR",
    "output_digest": "output_digest", "error": "error::VARCHAR", "reason": "reason",
    "cancelled_by": "cancelled_by::VARCHAR", "attempt": "attempt", "worker_pid": "worker_pid",
    "worker_host": "worker_host", "output_kind": "output_kind", "position": "position", "ready_at": "ready_at",
    "params": "params::VARCHAR", "matrix_of": "matrix_of", "retry_of": "retry_of::VARCHAR",
    "cache_key": "cache_key", "cache_parts": "cache_parts::VARCHAR", "reused_from": "reused_from::VARCHAR",
    "cpu_user_ms": "cpu_user_ms", "cpu_system_ms": "cpu_system_ms", "max_rss_bytes": "max_rss_bytes",
    "threads": "threads",
}
_RUN_SELECT = "SELECT " + ", ".join(f"{sql} AS {name}" for name, sql in _RUN_FIELDS.items()) + " FROM runs"


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    col = dict(zip(_RUN_FIELDS, row, strict=True))
    return RunRecord(
        run_id=col["run_id"],
        spec_digest=col["spec_digest"],
        metadata={"git_sha": col["git_sha"], "agent_name": col["agent_name"],
                  "tags": json.loads(col["tags"]) if col["tags"] else {}},
        status=RunStatus(col["status"]),
        summary=RunSummary(col["total_events"], col["final_state_digest"], col["duration_ms"], bool(col["success"])),
        created_at=col["queued_at"],
        completed_at=col["finished_at"],
        parent_run_id=col["parent_run_id"],
        role=as_role(col["role"]),
        queued_at=col["queued_at"],
        started_at=col["started_at"],
        finished_at=col["finished_at"],
        output=output_from_json(col["output"], col["output_kind"]) if col["output"] is not None else None,
        output_digest=col["output_digest"],
        error=ErrorInfo(**json.loads(col["error"])) if col["error"] else None,
        reason=Reason(col["reason"]) if col["reason"] else None,
        cancelled_by=col["cancelled_by"],
        attempt=col["attempt"],
        worker_pid=col["worker_pid"],
        worker_host=col["worker_host"],
        position=col["position"],
        ready_at=col["ready_at"],
        params=json.loads(col["params"]) if col["params"] is not None else None,
        matrix_of=col["matrix_of"],
        output_kind=col["output_kind"],
        retry_of=col["retry_of"],
        cache_key=col["cache_key"],
        cache_parts=json.loads(col["cache_parts"]) if col["cache_parts"] is not None else None,
        reused_from=col["reused_from"],
        cost=Cost(col["cpu_user_ms"], col["cpu_system_ms"], col["max_rss_bytes"])
        if col["cpu_user_ms"] is not None or col["max_rss_bytes"] is not None else None,
        threads=col["threads"],
    )


class Ledger:
    """A parroles ledger file. Use as a context manager; reads are safe while a batch writes.

    ``read_only=True`` opens an existing ledger without taking part in writing
    (what the read commands of the CLI do); by default the file is created if
    missing and orphaned batches are reconciled.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False,
                 busy_timeout: float = ledger_db.DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.read_only = read_only
        self.busy_timeout = busy_timeout
        self._writer: LedgerWriter | None = None
        self.reconciled: list[str] = []
        self.schema_version: int = SCHEMA_VERSION  # a read-only open says what the file has
        if read_only:
            self._check_readable()
        else:
            self._writer = LedgerWriter(self.path, busy_timeout)
            try:
                opened = self._writer.open()
            except BaseException:
                writer, self._writer = self._writer, None
                with contextlib.suppress(Exception):  # the open's own error is the one to raise
                    writer.close(wait=0)
                raise
            self.reconciled = opened.reconciled
            for problem in opened.damaged_journals:
                warnings.warn(JournalDamagedWarning(problem), stacklevel=2)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Commit what is pending (waiting up to ``busy_timeout`` for the file) and let the file go.

        Records the file could not take in time stay in the journal and a
        ``LedgerPendingWarning`` says how many; ``LedgerError`` if they could
        be neither committed nor journaled.
        """
        self._warn_pending(self.close_writer(self.busy_timeout))

    def close_writer(self, wait: float) -> int:
        """Close, waiting at most ``wait`` seconds for the last commit; returns the records left in the journal."""
        if self._writer is None:
            return 0
        writer, self._writer = self._writer, None
        return writer.close(wait)

    def _warn_pending(self, records: int) -> None:
        if records:
            warnings.warn(LedgerPendingWarning(self.path, records), stacklevel=3)

    @property
    def writer(self) -> LedgerWriter:
        if self._writer is None:
            raise LedgerError(f"ledger {self.path} is {'read-only' if self.read_only else 'closed'}")
        return self._writer

    def _connect(self) -> Any:
        return ledger_db.connect(self.path, read_only=self.read_only, busy_timeout=self.busy_timeout)

    def _check_readable(self) -> None:
        with self._connect() as con:
            tables = {name for (name,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            if not {"schema_version", "runs", "events", "batches"} <= tables:
                raise LedgerError(f"{self.path} is a DuckDB file but not a parroles ledger")
            (version,) = con.execute("SELECT max(version) FROM schema_version").fetchone()
            self.schema_version = int(version)
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{self.path} was written by a newer parroles (schema {version}); upgrade parroles")

    # -- reads -------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a read query of parroles' own and return its rows (what is committed)."""
        if self._writer is not None:  # on the writer's connection: no open of its own
            rows: list[tuple[Any, ...]] = self._writer.run(lambda con: con.execute(sql, params or []).fetchall())
            return rows
        with self._connect() as con:
            rows = con.execute(sql, params or []).fetchall()
            return rows

    def get_run(self, run_id: str) -> RunRecord:
        rows = self.query(_RUN_SELECT + " WHERE run_id = TRY_CAST(? AS UUID)", [run_id])
        if not rows:
            raise RunNotFoundError(f"no run {run_id} in {self.path}")
        return _run_record(rows[0])

    def get_events(self, run_id: str) -> list[RunEvent]:
        rows = self.query("SELECT seq, kind, payload::VARCHAR, ts FROM events WHERE run_id = TRY_CAST(? AS UUID)"
                          " ORDER BY seq", [run_id])
        return [RunEvent(seq, kind, json.loads(payload) if payload is not None else None, ts)
                for seq, kind, payload, ts in rows]

    def get_logs(self, run_id: str, stream: str | None = None, tail: int | None = None,
                 after: int = 0) -> list[LogLine]:
        """What a run wrote to its stdout and stderr, in order (only ``stream``; only the last ``tail``;
        only lines after seq ``after``)."""
        sql = "SELECT seq, stream, line, ts FROM logs WHERE run_id = TRY_CAST(? AS UUID) AND seq > ?"
        params: list[Any] = [run_id, after]
        if stream is not None:
            sql += " AND stream = ?"
            params.append(stream)
        if tail is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT {int(tail)})"
        return [LogLine(*row) for row in self.query(sql + " ORDER BY seq", params)]

    def get_log_tails(self, run_ids: Sequence[str], tail: int) -> dict[str, list[LogLine]]:
        """The last ``tail`` lines each of ``run_ids`` wrote, in order, in one query (a run that wrote
        nothing is absent)."""
        rows = self.query(
            "SELECT CAST(run_id AS VARCHAR), seq, stream, line, ts FROM logs"
            " WHERE run_id IN (SELECT TRY_CAST(unnest(?::VARCHAR[]) AS UUID))"
            " QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY seq DESC) <= ? ORDER BY run_id, seq",
            [list(run_ids), tail])
        tails: dict[str, list[LogLine]] = {}
        for run_id, *line in rows:
            tails.setdefault(run_id, []).append(LogLine(*line))
        return tails

    def list_runs(self, parent_run_id: str | None = None, status: RunStatus | str | None = None,
                  spec_digest: str | None = None, role: RoleName | None = None,
                  limit: int | None = None) -> list[RunRecord]:
        """Runs matching every filter given: a batch's in role order, else newest first."""
        where, params = [], []
        for column, value in (("parent_run_id", parent_run_id), ("spec_digest", spec_digest)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if status is not None:
            where.append("status = ?")
            params.append(RunStatus(status).value)
        if role is not None:  # a matrix role's name matches each of its expansions too
            where.append("(role = ? OR matrix_of = ?)")
            params += [role_name(role)] * 2
        sql = _RUN_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY position" if parent_run_id is not None else " ORDER BY queued_at DESC, position"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_run_record(row) for row in self.query(sql, params)]

    def resolve_run_id(self, prefix: str) -> str:
        """The run whose id is ``prefix`` or starts with it; RunNotFoundError, or ConfigError if several do."""
        return self._resolve("run", "SELECT run_id::VARCHAR AS id FROM runs", prefix)

    def resolve_batch_id(self, prefix: str) -> str:
        """The batch whose id is ``prefix`` or starts with it; RunNotFoundError, or ConfigError if several do."""
        return self._resolve("batch", "SELECT batch_id AS id FROM batches", prefix)

    def _resolve(self, what: str, ids: str, prefix: str) -> str:
        if not prefix:
            raise ConfigError(f"an empty {what} id: give the id, or the start of it")
        found = [found for (found,) in self.query(
            f"SELECT id FROM ({ids}) WHERE starts_with(id, ?) ORDER BY id LIMIT {AMBIGUOUS_SHOWN + 1}", [prefix])]
        if prefix in found or len(found) == 1:
            return prefix if prefix in found else found[0]
        if not found:
            raise RunNotFoundError(f"no {what} {prefix} in {self.path}")
        listed = ", ".join(found[:AMBIGUOUS_SHOWN]) + (", ..." if len(found) > AMBIGUOUS_SHOWN else "")
        raise ConfigError(f"{prefix!r} is the start of more than one {what} id: {listed}; give more of it")

    def has_batch(self, batch_id: str) -> bool:
        """Whether a batch with this id is in the ledger (committed)."""
        return bool(self.query("SELECT 1 FROM batches WHERE batch_id = ?", [batch_id]))

    def get_batch(self, parent_run_id: str) -> BatchRecord:
        batches = self.list_batches(batch_id=parent_run_id)
        if not batches:
            raise RunNotFoundError(f"no batch {parent_run_id} in {self.path}")
        return batches[0]

    def list_batches(self, limit: int | None = None, batch_id: str | None = None) -> list[BatchRecord]:
        sql = """
            SELECT b.batch_id, b.name, b.spec_digest, b.config::VARCHAR, b.state, b.started_at, b.finished_at,
                   b.owner_host, b.owner_pid, b.n_roles, b.owner_started, b.spec_path, b.resumed_from, b.run_order,
                   (SELECT map_from_entries(list((status, n))) FROM
                      (SELECT status, count(*) AS n FROM runs r WHERE r.parent_run_id = b.batch_id GROUP BY status))
            FROM batches b
        """
        params: list[Any] = []
        if batch_id is not None:
            sql += " WHERE b.batch_id = ?"
            params.append(batch_id)
        sql += " ORDER BY b.started_at DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        out = []
        for (bid, name, digest, config, state, started, finished, host, pid, roles, owner_started, spec_path,
             resumed_from, run_order, counts) in self.query(sql, params):
            full = {status.value: 0 for status in RunStatus} | dict(counts or {})
            out.append(BatchRecord(bid, name, digest, json.loads(config) if config else {}, BatchState(state),
                                   started, finished, full, host, pid, roles, owner_started, spec_path,
                                   resumed_from, run_order))
        return out

    def run_status(self, run_id: str) -> tuple[RunStatus, int]:
        rows = self.query("SELECT status, total_events FROM runs WHERE run_id = TRY_CAST(? AS UUID)", [run_id])
        if not rows:
            raise RunNotFoundError(f"no run {run_id} in {self.path}")
        return RunStatus(rows[0][0]), rows[0][1]

    # -- writes outside a batch (the run-ledger contract: create, append, finish) -----------

    def create_run(self, spec_digest: str, role: RoleName, parent_run_id: str,
                   metadata: dict[str, Any] | None = None) -> str:
        """A new QUEUED run outside any executor batch; returns its run id."""
        validate_digest(spec_digest)
        run_id = str(uuid.uuid4())
        self.writer.start_runs(NewRuns([run_id], [0], [role_name(role)], parent_run_id, spec_digest,
                                       (metadata or {}).get("git_sha"), time.time()))
        self._warn_pending(self.writer.flush())
        return run_id

    def append_event(self, run_id: str, kind: str, payload: Any = None) -> int:
        """Append an event to an active run; LedgerError if the run is terminal."""
        self._adopt(run_id)
        seq = self.writer.add_event(run_id, kind, canonical_json(payload), time.time())
        self._warn_pending(self.writer.flush())
        return seq

    def finish_run(self, run_id: str, status: RunStatus, *, error: ErrorInfo | None = None,
                   reason: Reason | None = None) -> None:
        """End an active run; LedgerError if it is already terminal."""
        status = RunStatus(status)
        if not status.terminal:
            raise ValueError(f"finish_run needs a terminal status, got {status.value}")
        self._adopt(run_id)
        self.writer.transition(run_id, status, finished_at=time.time(),
                               error=canonical_json(error.to_dict()) if error else None,
                               reason=reason.value if reason else None)
        self._warn_pending(self.writer.flush())

    def _adopt(self, run_id: str) -> None:
        if not self.writer.knows(run_id):
            status, total_events = self.run_status(run_id)
            self.writer.adopt(run_id, status, total_events)


def apply_journals(path: str | os.PathLike[str], busy_timeout: float) -> int:
    """Before a read: apply journals no live writer holds, if the file can be taken for writing
    within ``busy_timeout``; returns how many records the ledger's journals still hold."""
    path = os.path.abspath(os.fspath(path))
    if not ledger_journal.journal_paths(path):
        return 0  # the usual case: a directory listing, nothing more
    if journals_to_apply(path):
        try:
            Ledger(path, busy_timeout=busy_timeout).close_writer(busy_timeout)
        except LedgerError:
            pass  # busy, damaged or read-only: the reader shows what is committed, and says what is not
    return ledger_journal.pending_records(path)


def journals_to_apply(path: str | os.PathLike[str]) -> bool:
    """Whether the ledger has journals no live writer holds: what ``apply_journals`` would apply."""
    path = os.path.abspath(os.fspath(path))
    return bool(ledger_journal.journal_paths(path)) and os.path.isfile(path) and ledger_journal.orphaned_count(path) > 0
