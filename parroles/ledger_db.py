"""Opening the DuckDB file, and the one place DuckDB's errors become parroles errors.

DuckDB lets one process hold a file for writing, or any number hold it
read-only. parroles opens the file for as long as one read or one group
commit takes, so a batch never locks readers out for long, and waits with
bounded backoff when another process holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from parroles.errors import LedgerBusyError, LedgerError

if TYPE_CHECKING:
    import duckdb

DEFAULT_BUSY_TIMEOUT = 10.0
_LOCK_HELD = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")

# DuckDB refuses two connections to one file with different settings in one
# process; every open of a path in this process goes through its lock.
_path_locks: dict[str, threading.RLock] = {}
_path_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.RLock:
    with _path_locks_guard:
        return _path_locks.setdefault(path, threading.RLock())


def translate(exc: Exception, path: str) -> LedgerError:
    """A DuckDB (or OS) error about the ledger file, as a parroles LedgerError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    held = _LOCK_HELD.search(str(exc))
    if held:
        return LedgerBusyError(f"ledger is busy: {path} is held by PID {held['pid']} ({held['prog']})")
    if "not a valid DuckDB database file" in str(exc) or "database file" in text and "version" in text:
        return LedgerError(f"{path} is not a parroles ledger (not a DuckDB database file)")
    return LedgerError(f"ledger {path}: {text}")


@contextlib.contextmanager
def connect(
    path: str, *, read_only: bool, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, config: dict[str, object] | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` for one unit of work, waiting out another process's lock."""
    import duckdb

    if read_only and not os.path.isfile(path):
        raise LedgerError(f"no ledger at {path}")
    if not read_only:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the folder of ledger {path}: {exc.strerror}") from exc
    with _lock_for(path):
        deadline = time.monotonic() + busy_timeout
        delay = 0.005
        while True:
            try:
                con = duckdb.connect(path, read_only=read_only, config=config or {})
                break
            except duckdb.Error as exc:
                error = translate(exc, path)
                if not isinstance(error, LedgerBusyError) or time.monotonic() + delay > deadline:
                    raise error from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            yield con
        except duckdb.Error as exc:
            raise translate(exc, path) from exc
        finally:
            con.close()
