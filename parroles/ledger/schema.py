"""The ledger's tables, as numbered migrations. Version N is MIGRATIONS[N - 1].

Later versions append migrations; a ledger written by an older parroles is
brought up to date the first time a newer one opens it for writing.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from parroles.errors import LedgerError

if TYPE_CHECKING:
    import duckdb

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE batches (
        batch_id      VARCHAR PRIMARY KEY,
        name          VARCHAR,
        spec_digest   VARCHAR,
        config        JSON,
        state         VARCHAR NOT NULL,
        started_at    TIMESTAMPTZ NOT NULL,
        finished_at   TIMESTAMPTZ,
        n_roles       INTEGER NOT NULL,
        owner_host    VARCHAR NOT NULL,
        owner_pid     INTEGER NOT NULL,
        owner_started DOUBLE NOT NULL
    );
    CREATE TABLE runs (
        run_id             UUID NOT NULL,  -- unique by construction (uuid4, one writer); no index: see below
        parent_run_id      VARCHAR NOT NULL,
        position           INTEGER NOT NULL,
        role               VARCHAR NOT NULL,
        status             VARCHAR NOT NULL,
        spec_digest        VARCHAR,
        agent_name         VARCHAR NOT NULL,
        git_sha            VARCHAR,
        tags               JSON,
        queued_at          TIMESTAMPTZ NOT NULL,
        started_at         TIMESTAMPTZ,
        finished_at        TIMESTAMPTZ,
        duration_ms        DOUBLE,
        total_events       INTEGER NOT NULL DEFAULT 0,
        success            BOOLEAN,
        final_state_digest VARCHAR,
        output             JSON,
        output_digest      VARCHAR,
        error              JSON,
        reason             VARCHAR,
        cancelled_by       UUID,
        attempt            INTEGER NOT NULL DEFAULT 1,
        worker_pid         INTEGER,
        worker_host        VARCHAR
    );
    CREATE TABLE events (
        run_id  UUID NOT NULL,
        seq     INTEGER NOT NULL,
        kind    VARCHAR NOT NULL,
        payload JSON,
        ts      TIMESTAMPTZ NOT NULL
    );
    """,
    # 2: one row per edge a batch handed over (a role's output to a role that needs it).
    """
    CREATE TABLE handoffs (
        token_id      UUID NOT NULL,
        from_run_id   UUID NOT NULL,
        to_run_id     UUID NOT NULL,
        output_digest VARCHAR NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL
    );
    """,
    # 3: what each role wrote to its stdout and stderr, a row per line.
    """
    CREATE TABLE logs (
        run_id UUID NOT NULL,
        seq    INTEGER NOT NULL,
        stream VARCHAR NOT NULL,
        line   VARCHAR NOT NULL,
        ts     TIMESTAMPTZ NOT NULL
    );
    """,
    # 4: which typed output (its kind) a run returned, NULL for a plain JSON value (and for every run
    # recorded before parroles said so: a dict is never taken for a typed output by its shape); what a
    # run was given (its keyword arguments, the role a matrix expansion came from), and when its needs
    # were met, and the attempt a retry follows. NULL in runs recorded before.
    """
    ALTER TABLE runs ADD COLUMN output_kind VARCHAR;
    ALTER TABLE runs ADD COLUMN params JSON;
    ALTER TABLE runs ADD COLUMN matrix_of VARCHAR;
    ALTER TABLE runs ADD COLUMN ready_at TIMESTAMPTZ;
    ALTER TABLE runs ADD COLUMN retry_of UUID;
    """,
    # 5: each run's cache key and the parts it was computed from (``parroles.cache.keys``), the run a
    # reused run took its output from; the spec file a batch ran and the batch it resumed.
    """
    ALTER TABLE runs ADD COLUMN cache_key VARCHAR;
    ALTER TABLE runs ADD COLUMN cache_parts JSON;
    ALTER TABLE runs ADD COLUMN reused_from UUID;
    ALTER TABLE batches ADD COLUMN spec_path VARCHAR;
    ALTER TABLE batches ADD COLUMN resumed_from VARCHAR;
    """,
    # 6: what each run cost (``backends.usage``): CPU time of its worker and children, its peak resident
    # memory, and the thread cap it ran under; the order a batch started its ready roles in.
    """
    ALTER TABLE runs ADD COLUMN cpu_user_ms DOUBLE;
    ALTER TABLE runs ADD COLUMN cpu_system_ms DOUBLE;
    ALTER TABLE runs ADD COLUMN max_rss_bytes BIGINT;
    ALTER TABLE runs ADD COLUMN threads INTEGER;
    ALTER TABLE batches ADD COLUMN run_order VARCHAR;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
# The tables this version of parroles creates, read from the DDL itself (for help texts; what a
# given ledger holds is read from its catalog: ``ledger.export.ledger_tables``).
TABLES: tuple[str, ...] = tuple(re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)",
                                           "\n".join((*MIGRATIONS, VERSION_TABLE))))

# Why ``runs.run_id`` has no PRIMARY KEY: an ART index on a random UUID costs more
# than half of a bulk insert's time (measured: 100,000 runs in 0.15 s with it,
# 0.075 s without). Ids are uuid4 made by the one writer, which also checks that
# every UPDATE touched exactly the runs it meant to; lookups by id scan with zone maps.

# Columns of ``runs`` in table order, with the Arrow type each travels as.
RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("run_id", "string"),
    ("parent_run_id", "string"),
    ("position", "int64"),
    ("role", "string"),
    ("status", "string"),
    ("spec_digest", "string"),
    ("agent_name", "string"),
    ("git_sha", "string"),
    ("tags", "string"),
    ("queued_at", "float64"),
    ("started_at", "float64"),
    ("finished_at", "float64"),
    ("duration_ms", "float64"),
    ("total_events", "int64"),
    ("success", "bool"),
    ("final_state_digest", "string"),
    ("output", "string"),
    ("output_digest", "string"),
    ("error", "string"),
    ("reason", "string"),
    ("cancelled_by", "string"),
    ("attempt", "int64"),
    ("worker_pid", "int64"),
    ("worker_host", "string"),
    ("output_kind", "string"),
    ("params", "string"),
    ("matrix_of", "string"),
    ("ready_at", "float64"),
    ("retry_of", "string"),
    ("cache_key", "string"),
    ("cache_parts", "string"),
    ("reused_from", "string"),
    ("cpu_user_ms", "float64"),
    ("cpu_system_ms", "float64"),
    ("max_rss_bytes", "int64"),
    ("threads", "int64"),
)
TIMESTAMP_COLUMNS = frozenset({"queued_at", "started_at", "finished_at", "ready_at"})
UUID_COLUMNS = frozenset({"run_id", "cancelled_by", "retry_of", "reused_from"})
JSON_COLUMNS = frozenset({"tags", "output", "error", "params", "cache_parts"})
# Columns a transition may change after the run was inserted.
UPDATABLE = tuple(name for name, _ in RUN_COLUMNS if name not in {"run_id", "parent_run_id", "position", "role",
                                                                   "spec_digest", "agent_name", "git_sha", "tags",
                                                                   "queued_at", "params", "matrix_of",
                                                                   "retry_of"})


def migrate(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Bring the ledger at ``con`` up to SCHEMA_VERSION (run by the ledger writer, which owns every write).

    One transaction: a process stopped midway leaves the file as it was, never half a schema.
    """
    con.begin()
    try:
        con.execute(VERSION_TABLE)
        (version,) = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()  # type: ignore[misc]
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{path} was written by a newer parroles (schema {version} > {SCHEMA_VERSION}); upgrade parroles"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            con.execute(MIGRATIONS[number - 1])
            con.execute("INSERT INTO schema_version VALUES (?, now())", [number])
        con.commit()
    except BaseException:
        with contextlib.suppress(Exception):  # the error that matters is the one above
            con.rollback()
        raise
