"""``parroles sql``: one read-only query over the ledger, read-only in fact.

DuckDB's ``read_only=True`` alone still lets a query write files (``COPY``,
``EXPORT DATABASE``), read any file (``read_text``, ``read_csv``), install
extensions, spill to a temporary folder beside the ledger, and unlock its own
configuration. So the ledger is attached read-only to an instance with
extension loading and spilling off, external access is then turned off and
the configuration locked, only a single SELECT-like statement is accepted
(``EXPLAIN [ANALYZE]`` only of one), memory is capped, and rows are fetched
a batch at a time, at most ``max_rows`` of them, so that the answer is never
held whole: ``Answer.batches`` hands them to the printer as they come. A
query that spends longer than the timeout in DuckDB is interrupted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from parroles.errors import UnsafeQueryError
from parroles.ledger import db as ledger_db

if TYPE_CHECKING:
    import duckdb

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
# Rows taken from DuckDB at a time. DuckDB itself holds a vector of 2,048 rows;
# a fetch of fewer keeps what Python holds besides small even when rows are
# large (6,000 rows of 100 KB, printed: ~0.7 GB peak at 256, over 1 GB at 2,048).
FETCH_ROWS = 256
OUT_OF_MEMORY = ("this process ran out of memory holding the answer's rows; select fewer or smaller columns "
                 "(parroles sql prints the answer as it fetches it)")


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


class Answer:
    """The rows of a query being run, fetched a batch at a time; at most ``max_rows`` of them.

    ``truncated`` says, once ``batches`` is exhausted, whether more rows were left unfetched.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, query: str, timeout: float, max_rows: int) -> None:
        self._budget = _Budget(con, timeout)
        self.max_rows = max_rows
        self.truncated = False
        with self._budget.running():
            self._cursor = con.execute(query)
        described = self._cursor.description or []
        self.columns = [d[0] for d in described]
        # Their values arrive as JSON text; the machine formats give them as JSON values.
        self.json_columns = frozenset(i for i, d in enumerate(described) if str(d[1]) == "JSON")

    def batches(self) -> Iterator[list[tuple[Any, ...]]]:
        shown = 0
        while True:
            with self._budget.running():  # at max_rows: one more row, to know whether there were more
                batch = self._cursor.fetchmany(FETCH_ROWS if shown < self.max_rows else 1)
            if not batch:
                return
            room = self.max_rows - shown
            if len(batch) > room:
                self.truncated = True
                if room:
                    yield batch[:room]
                return
            shown += len(batch)
            yield batch


class _Budget:
    """The time the query spends in DuckDB, across its fetches: past ``timeout`` seconds in all, it is interrupted.

    Time between fetches, spent printing what was fetched, does not count: a
    slow reader of the output (a pager) does not make a slow query.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, timeout: float) -> None:
        self.con = con
        self.timeout = timeout
        self.left = timeout

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        import duckdb

        timer = threading.Timer(max(self.left, 0.0), self.con.interrupt)
        timer.daemon = True
        started = time.monotonic()
        timer.start()
        try:
            yield
        except duckdb.InterruptException as exc:
            raise UnsafeQueryError(f"query interrupted after the timeout of {self.timeout:g} s") from exc
        except duckdb.OutOfMemoryException as exc:
            raise UnsafeQueryError(f"query needs more than the {MEMORY_LIMIT} parroles sql allows: "
                                   f"{ledger_db.first_line(exc)}") from exc
        except MemoryError as exc:
            raise UnsafeQueryError(OUT_OF_MEMORY) from exc
        except duckdb.PermissionException as exc:
            raise UnsafeQueryError(f"refused: {exc}") from exc
        except duckdb.Error as exc:
            raise UnsafeQueryError(f"query failed: {exc}") from exc
        finally:
            timer.cancel()
            self.left -= time.monotonic() - started


@contextlib.contextmanager
def answer(path: str, query: str, timeout: float, busy_timeout: float = 5.0,
           max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[Answer]:
    """Run ``query`` (refused unless ``check_query`` passes it) on the ledger at ``path``; its rows as they come."""
    check_query(query)
    with ledger_db.connect(path, read_only=True, busy_timeout=busy_timeout, config=SAFE_CONFIG) as con:
        for statement in LOCK_DOWN:
            con.execute(statement)
        yield Answer(con, query, timeout, max_rows)


def rehearse(path: str, query: str, timeout: float, busy_timeout: float = 5.0,
             max_rows: int = DEFAULT_MAX_ROWS) -> None:
    """Run ``query`` to its end as ``answer`` would, its rows dropped: raises what running it for real would.

    DuckDB refuses some queries as it binds them (``read_text``) and others
    only as it runs them (``duckdb_extensions()``); a query can also fail on
    its data or run out of time. Run before journals are applied, so that a
    query that fails has changed nothing.
    """
    with answer(path, query, timeout, busy_timeout, max_rows) as rows:
        for _ in rows.batches():
            pass
