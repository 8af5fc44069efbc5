"""``parroles sql``: one read-only query over the ledger, read-only in fact.

DuckDB's ``read_only=True`` alone still lets a query write files (``COPY``,
``EXPORT DATABASE``), read any file (``read_text``, ``read_csv``), install
extensions, spill to a temporary folder beside the ledger, and unlock its own
configuration. So the ledger is attached read-only to an instance with
extension loading and spilling off, external access is then turned off and
its configuration locked, only a single
SELECT-like statement is accepted (``EXPLAIN [ANALYZE]`` only of one), memory
is capped, rows are fetched a batch at a time up to ``max_rows``, and a query
past the timeout is interrupted.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from parroles.errors import UnsafeQueryError
from parroles.ledger import db as ledger_db

MEMORY_LIMIT = "1GB"
SAFE_CONFIG = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "memory_limit": MEMORY_LIMIT,
    "temp_directory": "",  # no spilling: a query over the cap fails instead of filling the disk
}
# Run once the ledger is attached (attaching the file is itself an external access DuckDB would refuse).
LOCK_DOWN = ("SET enable_external_access = false", "SET lock_configuration = true")
DEFAULT_MAX_ROWS = 10_000
FETCH_ROWS = 2_048  # rows taken from DuckDB at a time, so what is fetched never outgrows what is printed


@dataclasses.dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False  # more rows than max_rows: the rest were not fetched


def check_query(query: str) -> None:
    """Refuse anything but exactly one SELECT, or an EXPLAIN [ANALYZE] of one."""
    statements = _statements(query)
    if len(statements) != 1:
        raise UnsafeQueryError(f"exactly one statement is allowed, got {len(statements)}")
    kind = _kind(statements[0])
    if kind == "EXPLAIN":
        inner = _explained(query)
        if len(_statements(inner)) != 1 or _kind(_statements(inner)[0]) != "SELECT":
            raise UnsafeQueryError("EXPLAIN and EXPLAIN ANALYZE are allowed only of a SELECT")
    elif kind != "SELECT":
        raise UnsafeQueryError(f"only a read query (SELECT) is allowed, got {kind}")


def _statements(query: str) -> list[Any]:
    import duckdb

    try:
        return list(duckdb.extract_statements(query))
    except duckdb.Error as exc:
        raise UnsafeQueryError(f"cannot parse the query: {exc}") from exc


def _kind(statement: Any) -> str:
    try:
        return str(statement.type.name)
    except ValueError:  # a statement type this duckdb's Python enum does not know (e.g. UPDATE EXTENSIONS)
        return "an unknown statement type"


def _explained(query: str) -> str:
    """The statement an EXPLAIN [ANALYZE] [(options)] explains."""
    import duckdb

    tokens = [pos for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment]
    texts = [query[pos:end].strip().upper() for pos, end in zip(tokens, [*tokens[1:], len(query)], strict=True)]
    index = 1  # past EXPLAIN
    if index < len(texts) and texts[index] == "ANALYZE":
        index += 1
    if index < len(texts) and texts[index].startswith("("):
        depth = 0
        while index < len(texts):
            depth += texts[index].count("(") - texts[index].count(")")
            index += 1
            if depth <= 0:
                break
    return query[tokens[index]:] if index < len(tokens) else ""


def run_query(path: str, query: str, timeout: float, busy_timeout: float = 5.0,
              max_rows: int = DEFAULT_MAX_ROWS) -> QueryResult:
    check_query(query)
    import duckdb

    with ledger_db.connect(path, read_only=True, busy_timeout=busy_timeout, config=SAFE_CONFIG) as con:
        for statement in LOCK_DOWN:
            con.execute(statement)
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            cursor = con.execute(query)
            rows: list[tuple[Any, ...]] = []
            while len(rows) <= max_rows and (batch := cursor.fetchmany(FETCH_ROWS)):
                rows.extend(batch)
        except duckdb.InterruptException as exc:
            raise UnsafeQueryError(f"query interrupted after the timeout of {timeout:g} s") from exc
        except duckdb.OutOfMemoryException as exc:
            raise UnsafeQueryError(f"query needs more than the {MEMORY_LIMIT} parroles sql allows: {exc}") from exc
        except duckdb.PermissionException as exc:
            raise UnsafeQueryError(f"refused: {exc}") from exc
        except duckdb.Error as exc:
            raise UnsafeQueryError(f"query failed: {exc}") from exc
        finally:
            timer.cancel()
        return QueryResult([d[0] for d in cursor.description or []], rows[:max_rows], len(rows) > max_rows)
