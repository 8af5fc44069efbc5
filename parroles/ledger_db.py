"""Opening the DuckDB file, and the one place DuckDB's errors become parroles errors.

DuckDB lets one process hold a file for writing, or any number hold it
read-only. parroles opens the file for as long as one read takes, or (the
writer's ``Lease``) a short run of back-to-back work, so a batch never locks
readers out for long, and waits with bounded backoff when another process
holds the lock.
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
# Short enough that a waiting reader finds the gap a busy writer leaves between leases.
MAX_BACKOFF = 0.05
# Every read-write open in this process uses these settings (DuckDB refuses two
# open instances of one file with different settings). Ledger commits are small:
# one thread leaves the cores to the workers.
READ_WRITE_CONFIG: dict[str, object] = {"threads": 1}
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


def open_connection(
    path: str, *, read_only: bool, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, config: dict[str, object] | None = None
) -> duckdb.DuckDBPyConnection:
    """Open ``path``, waiting out another process's lock. Pair with ``close_connection``."""
    import duckdb

    if read_only and not os.path.isfile(path):
        raise LedgerError(f"no ledger at {path}")
    if not read_only:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the folder of ledger {path}: {exc.strerror}") from exc
    lock = _lock_for(path)
    lock.acquire()
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            settings = config if config is not None else ({} if read_only else READ_WRITE_CONFIG)
            return duckdb.connect(path, read_only=read_only, config=dict(settings))
        except duckdb.Error as exc:
            error = translate(exc, path)
            if not isinstance(error, LedgerBusyError) or time.monotonic() + delay > deadline:
                lock.release()
                raise error from exc
        except BaseException:
            lock.release()
            raise
        time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def close_connection(path: str, con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.close()
    finally:
        _lock_for(path).release()


@contextlib.contextmanager
def translating(path: str) -> Iterator[None]:
    """Raise DuckDB errors met inside as LedgerErrors."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise translate(exc, path) from exc


@contextlib.contextmanager
def connect(
    path: str, *, read_only: bool, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, config: dict[str, object] | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` for one unit of work, waiting out another process's lock."""
    con = open_connection(path, read_only=read_only, busy_timeout=busy_timeout, config=config)
    try:
        with translating(path):
            yield con
    finally:
        close_connection(path, con)


# A writer keeps the file open across back-to-back work for up to LEASE
# seconds, then leaves it closed for at least GAP seconds so that readers in
# other processes get their turn.
LEASE = 0.5
GAP = 0.15


class Lease:
    """A writer's read-write connection, held across back-to-back work; used by one thread."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._con: duckdb.DuckDBPyConnection | None = None
        self._opened = 0.0
        self._closed = -GAP

    @property
    def held(self) -> bool:
        return self._con is not None

    def connection(self, urgent: bool) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            wait = self._closed + GAP - time.monotonic()
            if wait > 0 and not urgent:
                time.sleep(wait)  # the readers' turn: a gap after a full lease
            self._con = open_connection(self.path, read_only=False, busy_timeout=self.busy_timeout)
            self._opened = time.monotonic()
        return self._con

    def release_if_due(self) -> None:
        """Close the file if it has been held for a full lease."""
        if self._con is not None and time.monotonic() - self._opened > LEASE:
            self.release(gap=True)

    def release(self, gap: bool = False) -> None:
        if self._con is not None:
            con, self._con = self._con, None
            close_connection(self.path, con)
            self._closed = time.monotonic() if gap else -GAP
