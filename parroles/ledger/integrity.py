"""What a writable open checks before anything is written: the file is a parroles ledger, and whole.

Both run in ``commit.prepare``, before a migration or a journal touches the
file, so that a file refused stays byte-identical.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from parroles.errors import LedgerError
from parroles.ledger import db as ledger_db

if TYPE_CHECKING:
    import duckdb

# DuckDB's file starts with three 4 KiB headers; its blocks follow.
FILE_HEADERS = 3 * 4096


def check_is_ledger(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Refuse, before anything is written, a DuckDB file that holds tables but is no parroles ledger.

    An empty database is a ledger yet to be made; one with tables of its own
    and no ``schema_version`` is somebody else's, and stays byte-identical.
    """
    with ledger_db.translating(path):
        tables = [name for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
    if tables and "schema_version" not in tables:
        raise LedgerError(f"{path} is a DuckDB file but not a parroles ledger (it holds {', '.join(sorted(tables))}); "
                          "it is not written to")


def check_intact(con: duckdb.DuckDBPyConnection, path: str) -> None:
    """Refuse a ledger whose file lacks blocks its own catalog says hold data (e.g. a truncated file).

    Run before anything is written, so a damaged file stays byte-identical. A
    file found exactly as this process left it after writing it is not read
    again (``db.known_intact``): a process's batches one after another
    check their ledger once.
    """
    if not ledger_db.known_intact(path):
        needed, size = bytes_needed(con, path), os.path.getsize(path)
        if size < needed:
            raise LedgerError(f"ledger {path} is damaged (the file has {size} bytes, its tables need at least "
                              f"{needed}); it is not written to")
        ledger_db.mark_intact(path)


def bytes_needed(con: duckdb.DuckDBPyConnection, path: str) -> int:
    """The least size the file at ``con`` has if whole: its headers and every block its tables' segments use.

    Reads the catalog and each table's segment list, never the data: a few
    milliseconds on a small ledger, ~21 ms on one of 1,000,000 runs and
    2,000,000 events (reading every table once: ~110 ms).
    """
    with ledger_db.translating(path):
        tables = [name for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()]
        highest_of_each = " UNION ALL ".join(  # one query for all tables: a round trip each costs ~0.5 ms
            "SELECT max(greatest(block_id, coalesce(list_max(additional_block_ids), -1))) AS highest"
            f" FROM pragma_storage_info('{table}') WHERE persistent" for table in tables)
        block_size, highest = con.execute(  # type: ignore[misc]
            "SELECT (SELECT block_size FROM pragma_database_size() WHERE database_name = current_database()),"
            f" max(highest) FROM ({highest_of_each or 'SELECT NULL AS highest'})").fetchone()
    return FILE_HEADERS + (highest + 1) * block_size if highest is not None and highest >= 0 else 0
