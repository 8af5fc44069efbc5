"""The SQL that changes the ledger's rows. Called only from the ledger writer's thread.

``write_records`` commits one group of records in one transaction, with
set-based statements. ``apply_orphaned_journals`` applies what journals of
writers that are gone still hold; applying an entry twice changes nothing
(inserts skip rows already there, transitions only touch active runs), so a
journal whose records were committed just before its process died is
harmless. ``reconcile_orphans`` then ends the runs of batches whose parent
died. Schema changes live in ``ledger_schema``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from parroles.errors import ImmutableRunError, LedgerError, RunOrphaned
from parroles.ledger import db as ledger_db
from parroles.ledger import integrity
from parroles.ledger import journal as ledger_journal
from parroles.ledger.owner import Owner
from parroles.ledger.pending import (
    RUN_TYPES,
    NewRuns,
    Pending,
    arrow_column,
    arrow_table,
    arrow_type_of,
    present_columns,
)
from parroles.ledger.schema import JSON_COLUMNS, TIMESTAMP_COLUMNS, UPDATABLE, UUID_COLUMNS, migrate
from parroles.results import BatchState, ErrorInfo, Reason, RunStatus

if TYPE_CHECKING:
    import duckdb

ACTIVE_SQL = "('QUEUED', 'RUNNING')"


def write_records(con: duckdb.DuckDBPyConnection, path: str, pending: Pending, *, again: bool = False) -> None:
    """Commit ``pending`` in one transaction. ``again``: some of it may be in the file already."""
    with ledger_db.translating(path):
        con.begin()
        try:
            _write_batches(con, pending, again)
            _write_runs(con, pending, again)
            _write_events(con, pending, again)
            _write_handoffs(con, pending, again)
            _write_logs(con, pending, again)
            con.commit()
        except BaseException:
            # DuckDB may have ended the transaction itself (an I/O error): a
            # failed rollback must not replace the error that matters.
            with contextlib.suppress(Exception):
                con.rollback()
            raise


@dataclasses.dataclass(frozen=True)
class Opened:
    """What opening the ledger for writing found."""

    reconciled: list[str]  # batches whose parent had died, now ended
    damaged_journals: list[str]  # journals damaged in their middle: applied up to the damage, kept aside


def prepare(con: duckdb.DuckDBPyConnection, path: str) -> Opened:
    """A writable open's work, before anything else is written: refuse a damaged file, migrate the
    schema, apply the journals of writers that are gone, then reconcile orphaned batches."""
    integrity.check_intact(con, path)
    integrity.check_is_ledger(con, path)
    migrate(con, path)
    damaged = apply_orphaned_journals(con, path)
    return Opened(reconcile_orphans(con), damaged)


def apply_orphaned_journals(con: duckdb.DuckDBPyConnection, path: str) -> list[str]:
    """Apply, then delete, every journal of this ledger that no live writer holds; returns what went wrong.

    A journal this version cannot read stops the open (``LedgerError``): it may
    hold records, and nothing here may drop them. One damaged in its middle is
    applied up to the damage and kept as ``<journal>.damaged``, and said in the
    list returned (the caller warns); a tail cut short by a crash is ignored.
    """
    damaged = []
    for journal in ledger_journal.orphaned_journals(path):
        contents = journal.contents
        if contents.foreign:
            journal.release()
            raise LedgerError(f"{journal.path} is not a journal this parroles reads (a newer parroles wrote it?); "
                              "upgrade parroles, or move the file away to open the ledger without its records")
        try:
            for entry in contents.entries:
                write_records(con, path, entry, again=True)
        except Exception as exc:
            journal.release()
            raise LedgerError(f"cannot apply the journal {journal.path}: {exc} (if this keeps failing, moving the "
                              "file away opens the ledger without its records)") from exc
        if contents.damaged_at is None:
            journal.discard()
        else:
            kept = journal.set_aside()
            damaged.append(f"the journal {journal.path} is damaged after byte {contents.damaged_at}: its "
                           f"{len(contents.entries)} whole entries before that were applied, the rest could not "
                           f"be read; it is kept as {kept}")
    return damaged


def reconcile_orphans(con: duckdb.DuckDBPyConnection) -> list[str]:
    """End the runs of batches whose parent process died (found on this host only)."""
    rows = con.execute(
        "SELECT batch_id, owner_host, owner_pid, owner_started FROM batches WHERE state = ?", [BatchState.RUNNING.value]
    ).fetchall()
    dead = [batch_id for batch_id, host, pid, started in rows if Owner(host, pid, started).is_alive() is False]
    if not dead:
        return []
    error = json.dumps(ErrorInfo.of(RunOrphaned, "parent process died").to_dict())
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
                  "n_roles", "owner_host", "owner_pid", "owner_started", "spec_path", "resumed_from", "run_order")


def _write_batches(con: duckdb.DuckDBPyConnection, pending: Pending, again: bool) -> None:
    insert = "INSERT OR IGNORE INTO batches" if again else "INSERT INTO batches"
    for row in pending.batches.values():
        values = [row.get(name) for name in _BATCH_COLUMNS]
        con.execute(f"{insert} ({', '.join(_BATCH_COLUMNS)})"
                    " VALUES (?, ?, ?, ?::JSON, ?, to_timestamp(?), to_timestamp(?), ?, ?, ?, ?, ?, ?, ?)", values)
    for batch_id, cols in pending.batch_updates.items():
        con.execute(
            "UPDATE batches SET state = ?, finished_at = to_timestamp(?) WHERE batch_id = ?",
            [cols["state"], cols["finished_at"], batch_id],
        )


def _column_sql(name: str, source: str) -> str:
    return _typed_sql(name, f"{source}.{name}")


def _typed_sql(name: str, value: str) -> str:
    """``value`` as column ``name`` stores it (the relations carry timestamps as epochs, UUIDs and JSON as text)."""
    if name in TIMESTAMP_COLUMNS:
        return f"to_timestamp({value})"
    if name in UUID_COLUMNS:
        return f"CAST({value} AS UUID)"
    if name in JSON_COLUMNS:
        return f"CAST({value} AS JSON)"
    return value


# How many rows a statement binds as a VALUES list rather than through an Arrow table. Measured by
# timing _insert_runs both ways at 8 to 1,024 rows: with pyarrow loaded, Arrow is faster from about
# 64 rows (256 rows: 16 ms as VALUES, 7 ms as Arrow); loading pyarrow costs a fresh process about
# 0.1 s, more than any commit of up to SMALL rows saves, so until something loaded it such a
# statement binds values.
VALUES_ALWAYS = 64
SMALL = 256


def _as_values(count: int) -> bool:
    return count <= VALUES_ALWAYS or (count <= SMALL and "pyarrow" not in sys.modules)


@contextlib.contextmanager
def _rows(con: duckdb.DuckDBPyConnection, alias: str, columns: Mapping[str, tuple[Sequence[Any], str]],
          dicts: Sequence[Mapping[str, Any] | None] = (), names: Sequence[str] = (),
          prefix: str = "") -> Iterator[tuple[str, list[Any]]]:
    """Columns of equal length as a relation SQL reads as ``alias``, and the parameters it binds.

    ``columns`` maps a name to its values and their Arrow type ("string", "int64",
    "float64", "bool"): a few rows become a VALUES list, many an Arrow table.
    ``dicts`` (one per row, None for none) add the ``runs`` columns ``names`` as
    ``prefix + name``: taken from the dicts in Python for a few rows, in C++ for many.
    """
    count = len(next(iter(columns.values()))[0])
    if _as_values(count):
        columns = {**columns, **{prefix + name: ([row.get(name) if row else None for row in dicts], RUN_TYPES[name])
                                 for name in names}}
        placeholders = ", ".join(["(" + ", ".join(["?"] * len(columns)) + ")"] * count)
        params = [value for row in zip(*(values for values, _ in columns.values()), strict=True) for value in row]
        yield f"(VALUES {placeholders}) AS {alias}({', '.join(columns)})", params
        return
    import pyarrow as pa

    table = pa.table({name: pa.array(values, arrow_type_of(kind)) for name, (values, kind) in columns.items()})
    if names:
        taken = arrow_table(dicts, names)
        for name in names:
            table = table.append_column(prefix + name, taken.column(name))
    con.register(alias, table)
    try:
        yield f"{alias} AS {alias}", []
    finally:
        con.unregister(alias)


def _write_runs(con: duckdb.DuckDBPyConnection, pending: Pending, again: bool) -> None:
    updates = pending.run_updates
    folded: set[str] = set()
    for runs in pending.new_runs:  # inserted first: the updates below may be theirs
        # Runs that moved on before their insert are inserted as they are now, when most may have (else the
        # few are cheaper to update than null columns are to carry). Applied again, a run may be in the file
        # already: its insert is skipped, so its transitions are updates, as they were.
        fold = not again and 2 * len(updates) >= len(runs)
        folded |= _insert_runs(con, runs, again, updates if fold else {})
    run_ids = [run_id for run_id in updates if run_id not in folded] if folded else list(updates)
    if not run_ids:
        return
    rows = [updates[run_id] for run_id in run_ids]
    present = present_columns(rows)
    names = [name for name in UPDATABLE if name in present]
    if all(len(row) == len(names) for row in rows):  # every row sets every column: no coalesce needed
        assignments = ", ".join(f"{n} = {_column_sql(n, 'u')}" for n in names)
    else:
        assignments = ", ".join(f"{n} = coalesce({_column_sql(n, 'u')}, runs.{n})" for n in names)
    with _updates(con, run_ids, rows, names) as (source, params):
        (changed,) = con.execute(  # type: ignore[misc]
            f"UPDATE runs SET {assignments} FROM {source} WHERE runs.run_id = CAST(u.run_id AS UUID)"
            f" AND runs.status IN {ACTIVE_SQL}", params).fetchone()
    # Applied again, a transition already made finds its run terminal: that is the point.
    if changed != len(rows) and not again:
        raise ImmutableRunError(
            f"{len(rows) - changed} of {len(rows)} run transitions found their run missing or already terminal"
        )


@contextlib.contextmanager
def _updates(con: duckdb.DuckDBPyConnection, run_ids: list[str], rows: list[dict[str, Any]],
             names: list[str]) -> Iterator[tuple[str, list[Any]]]:
    """The transitions as relation ``u``; many of them as an Arrow table built from the dicts in C++."""
    if not _as_values(len(rows)):
        table = arrow_table(rows, names).append_column("run_id", arrow_column(run_ids, "run_id"))
        con.register("u", table)
        try:
            yield "u AS u", []
        finally:
            con.unregister("u")
        return
    columns: dict[str, tuple[Sequence[Any], str]] = {
        name: ([row.get(name) for row in rows], RUN_TYPES[name]) for name in names}
    columns["run_id"] = (run_ids, "string")
    with _rows(con, "u", columns) as relation:
        yield relation


def _insert_runs(con: duckdb.DuckDBPyConnection, runs: NewRuns, again: bool,
                 updates: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Insert ``runs``, each with what ``updates`` (its transitions not yet written) set; returns the run ids
    whose transitions the insert wrote (a run started and ended within one commit window costs no UPDATE)."""
    if not runs.run_ids:
        return set()
    columns: dict[str, tuple[Sequence[Any], str]] = {
        "run_id": (runs.run_ids, "string"), "position": (runs.positions, "int64"), "role": (runs.roles, "string")}
    # What only some batches have travels only when they have it.
    given = {name: values for name, values in (("params", runs.params), ("matrix_of", runs.matrix_of),
                                               ("retry_of", runs.retry_of)) if values is not None}
    # A run that needs nothing is ready as it is queued; one that waits gets its ready_at when it is.
    ready = "to_timestamp(?)" if runs.waiting is None else "CASE WHEN r.waiting THEN NULL ELSE to_timestamp(?) END"
    if runs.waiting is not None:
        columns["waiting"] = (runs.waiting, "bool")
    columns.update({name: (values, "string") for name, values in given.items()})
    attempt = "1"
    if runs.attempts is not None:
        columns["attempt"], attempt = (runs.attempts, "int64"), "r.attempt"
    moved = [updates.get(run_id) for run_id in runs.run_ids] if updates else []
    moved_names = [name for name in UPDATABLE if name in present_columns([m for m in moved if m])]
    # The columns the insert sets anyway take a transition's value when there is one.
    base = {"status": "'QUEUED'", "ready_at": ready, "total_events": "0", "attempt": attempt}
    for name in moved_names:
        if name in base:
            base[name] = f"coalesce({_typed_sql(name, f'r.moved_{name}')}, {base[name]})"
    extra = {**{name: _column_sql(name, "r") for name in given},
             **{name: _typed_sql(name, f"r.moved_{name}") for name in moved_names if name not in base}}
    with _rows(con, "r", columns, moved, moved_names, "moved_") as (source, params):
        only_new = (" WHERE CAST(r.run_id AS UUID) NOT IN (SELECT run_id FROM runs WHERE parent_run_id = ?)"
                    if again else "")
        shared = [runs.parent_run_id, runs.spec_digest, runs.git_sha, runs.parent_run_id, runs.queued_at,
                  runs.queued_at]
        con.execute(
            "INSERT INTO runs (run_id, parent_run_id, position, role, status, spec_digest, agent_name, git_sha, tags,"
            f" queued_at, ready_at, total_events, attempt{''.join(f', {name}' for name in extra)})"
            f" SELECT CAST(r.run_id AS UUID), ?, r.position, r.role, {base['status']}, ?, 'role:' || r.role, ?,"
            f" json_object('parent_run_id', ?, 'role', r.role), to_timestamp(?), {base['ready_at']},"
            f" {base['total_events']}, {base['attempt']}{''.join(f', {sql}' for sql in extra.values())}"
            f" FROM {source}"
            + only_new,
            shared + params + ([runs.parent_run_id] if again else []),
        )
    return {run_id for run_id, m in zip(runs.run_ids, moved, strict=True) if m} if moved_names else set()


def _write_events(con: duckdb.DuckDBPyConnection, pending: Pending, again: bool) -> None:
    _insert_numbered(con, "events", ("kind", "payload"), "CAST(n.payload AS JSON)", pending.events, again)


def _write_logs(con: duckdb.DuckDBPyConnection, pending: Pending, again: bool) -> None:
    _insert_numbered(con, "logs", ("stream", "line"), "n.line", pending.logs, again)


def _insert_numbered(con: duckdb.DuckDBPyConnection, table: str, texts: tuple[str, str], second_sql: str,
                     rows: list[tuple[str, int, str, Any, float]], again: bool) -> None:
    """Rows numbered per run, (run_id, seq, two texts, ts): the ``events`` and ``logs`` tables.

    Applied again: only rows not there yet, of runs the ledger has (a journal may outlive its ledger).
    """
    if not rows:
        return
    run_ids, seqs, firsts, seconds, stamps = zip(*rows, strict=True)
    first, second = texts
    columns = {"run_id": (run_ids, "string"), "seq": (seqs, "int64"), first: (firsts, "string"),
               second: (seconds, "string"), "ts": (stamps, "float64")}
    only_new = (f" WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.run_id = CAST(n.run_id AS UUID)"
                " AND t.seq = n.seq) AND CAST(n.run_id AS UUID) IN (SELECT run_id FROM runs)" if again else "")
    with _rows(con, "n", columns) as (source, params):
        con.execute(f"INSERT INTO {table} SELECT CAST(n.run_id AS UUID), n.seq, n.{first}, {second_sql},"
                    f" to_timestamp(n.ts) FROM {source}" + only_new, params)


def _write_handoffs(con: duckdb.DuckDBPyConnection, pending: Pending, again: bool) -> None:
    if not pending.handoffs:
        return
    tokens, sources, targets, digests, stamps = zip(*pending.handoffs, strict=True)
    columns = {"token_id": (tokens, "string"), "from_run_id": (sources, "string"),
               "to_run_id": (targets, "string"), "output_digest": (digests, "string"),
               "created_at": (stamps, "float64")}
    only_new = (" WHERE CAST(h.token_id AS UUID) NOT IN (SELECT token_id FROM handoffs)"
                " AND CAST(h.to_run_id AS UUID) IN (SELECT run_id FROM runs)" if again else "")
    with _rows(con, "h", columns) as (source, params):
        con.execute("INSERT INTO handoffs SELECT CAST(h.token_id AS UUID), CAST(h.from_run_id AS UUID),"
                    " CAST(h.to_run_id AS UUID), h.output_digest, to_timestamp(h.created_at)"
                    f" FROM {source}" + only_new, params)
