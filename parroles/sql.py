"""``parroles sql``: one read-only query over the ledger, read-only in fact.

DuckDB's ``read_only=True`` alone still lets a query write files (``COPY``,
``EXPORT DATABASE``), read any file (``read_text``, ``read_csv``), install
extensions, and unlock its own configuration. So the connection is opened
with external access and extension loading off, its configuration is then
locked, only a single SELECT-like statement is accepted, memory is capped,
and a query past the timeout is interrupted.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from parroles import ledger_db
from parroles.errors import UnsafeQueryError

ALLOWED = {"SELECT", "EXPLAIN"}
SAFE_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "memory_limit": "1GB",
}


@dataclasses.dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


def check_query(query: str) -> None:
    """Refuse anything but exactly one SELECT (or EXPLAIN) statement."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise UnsafeQueryError(f"cannot parse the query: {str(exc).splitlines()[0]}") from exc
    if len(statements) != 1:
        raise UnsafeQueryError(f"exactly one statement is allowed, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in ALLOWED:
        raise UnsafeQueryError(f"only a read query (SELECT) is allowed, got {kind}")


def run_query(path: str, query: str, timeout: float, busy_timeout: float = 5.0) -> QueryResult:
    check_query(query)
    import duckdb

    with ledger_db.connect(path, read_only=True, busy_timeout=busy_timeout, config=SAFE_CONFIG) as con:
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
        try:
            cursor = con.execute(query)
            rows = cursor.fetchall()
        except duckdb.InterruptException as exc:
            raise UnsafeQueryError(f"query interrupted after the timeout of {timeout:g} s") from exc
        except duckdb.PermissionException as exc:
            raise UnsafeQueryError(f"refused: {str(exc).splitlines()[0]}") from exc
        except duckdb.Error as exc:
            raise UnsafeQueryError(f"query failed: {str(exc).splitlines()[0]}") from exc
        finally:
            timer.cancel()
        return QueryResult([d[0] for d in cursor.description or []], rows)
