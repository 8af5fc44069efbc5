"""Opening the DuckDB file, and the one place DuckDB's errors become parroles errors.

DuckDB lets one process hold a file for writing, or any number hold it
read-only. parroles opens the file for as long as one read takes, or (the
writer's ``Lease``) a short run of back-to-back work, so a batch never locks
readers out for long, and waits with bounded backoff when another process
holds the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parroles.errors import LedgerBusyError, LedgerError

if TYPE_CHECKING:
    import duckdb

DEFAULT_BUSY_TIMEOUT = 10.0
# Short enough that a waiting reader finds the gap a busy writer leaves between leases.
MAX_BACKOFF = 0.05
# Every DuckDB instance parroles makes has these. A file that is not DuckDB's
# own (an SQLite database) would otherwise make DuckDB download and load the
# extension that reads it; attaching with TYPE duckdb keeps it from even trying.
NO_EXTENSIONS: dict[str, Any] = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# Settings of the process's DuckDB instance that ledger files are attached to.
# Ledger commits and parroles' own reads are small: one thread leaves the cores
# to the workers.
READ_WRITE_CONFIG: dict[str, Any] = {"threads": 1, **NO_EXTENSIONS}
_LOCK_HELD = re.compile(r"Conflicting lock is held in (?P<prog>.*?) \(PID (?P<pid>\d+)\)")

# DuckDB refuses two connections to one file with different settings in one
# process; every open of a path in this process goes through its lock.
_path_locks: dict[str, threading.RLock] = {}
_path_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.RLock:
    with _path_locks_guard:
        return _path_locks.setdefault(path, threading.RLock())


def first_line(exc: BaseException) -> str:
    """An error's first line (DuckDB's errors go on with context a one-line message does without)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unrecorded(path: str, records: int, commit: BaseException | None, journal: BaseException | None) -> LedgerError:
    """The error of records that could be neither committed (``commit``) nor journaled (``journal``)."""
    committed = f" ({first_line(commit.__cause__ or commit)})" if commit else ""
    journaled = f" ({getattr(journal, 'strerror', None) or journal})" if journal else ""
    error = LedgerError(f"ledger {path}: {records} record(s) could be neither committed{committed} "
                        f"nor journaled{journaled}")
    error.__cause__ = journal or commit
    return error


def translate(exc: Exception, path: str) -> LedgerError:
    """A DuckDB (or OS) error about the ledger file, as a parroles LedgerError."""
    text = first_line(exc)
    held = _LOCK_HELD.search(str(exc))
    if held:
        return LedgerBusyError(f"ledger is busy: {path} is held by PID {held['pid']} ({held['prog']})")
    if "not a valid DuckDB database file" in str(exc) or "database file" in text and "version" in text:
        return LedgerError(f"{path} is not a parroles ledger (not a DuckDB database file)")
    return LedgerError(f"ledger {path}: {text}")


def open_connection(
    path: str, *, read_only: bool, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, config: dict[str, Any] | None = None,
    stop: threading.Event | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open ``path``, waiting out another process's lock (until ``stop`` is set). Pair with ``close_connection``.

    Without ``config``, the file is attached to this process's one DuckDB
    instance (see ``_Attachments``); with it, it gets an instance of its own
    with those settings (``parroles sql`` locks its settings down that way).
    Either way extensions are never installed nor loaded (``NO_EXTENSIONS``).
    """
    import duckdb

    if read_only and not os.path.isfile(path):
        raise LedgerError(f"no ledger at {path}")
    if not read_only:
        _check_writable_path(path)
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
            if config is not None:
                con = _own_instance(path, read_only, config)
                _dedicated.add(id(con))
                return con
            return _attachments.attach(path, read_only)
        except duckdb.Error as exc:
            error, cause = translate(exc, path), exc
            if not isinstance(error, LedgerBusyError) or time.monotonic() + delay > deadline:
                lock.release()
                raise error from exc
        except BaseException:
            lock.release()
            raise
        if stop is not None and stop.wait(delay):  # the writer is closing: stop waiting for the lock
            lock.release()
            raise error from cause
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def _attach_statement(path: str, alias: str, read_only: bool) -> str:
    """ATTACH of a ledger: as a DuckDB file, whatever its first bytes say (no extension is looked for)."""
    literal = path.replace("'", "''")
    return f"ATTACH '{literal}' AS {alias} (TYPE duckdb{', READ_ONLY' if read_only else ''})"


def _check_writable_path(path: str) -> None:
    """Refuse, before anything is created, a ledger DuckDB could not write: one in a folder whose path holds a ``?``.

    DuckDB puts a database's write-ahead log at the database's path (symbolic
    links resolved) with ``.wal`` inserted before the first ``?``, taking what
    follows for a URL's parameters. A ``?`` in the file's own name keeps the
    log beside the file (``x.wal?.duckdb``); one in a folder's name sends it to
    another folder (``/a?b/x.duckdb`` to ``/a.wal?b/x.duckdb``), which does not
    exist, and the first commit fails. Reading needs no log, so reading works.
    """
    folder = os.path.realpath(os.path.dirname(path))
    if "?" in folder:
        mark = folder.index("?")
        log_folder = folder[:mark] + ".wal" + folder[mark:]
        raise LedgerError(f"cannot write ledger {path}: DuckDB would put its write-ahead log in {log_folder} "
                          "(a '?' in a folder's name); keep the ledger in a folder whose path has no '?'")


def _own_instance(path: str, read_only: bool, config: dict[str, Any]) -> duckdb.DuckDBPyConnection:
    """``path`` attached to a DuckDB instance of its own, made with ``config``, and in use."""
    import duckdb

    con = duckdb.connect(":memory:", config={**config, **NO_EXTENSIONS})
    try:
        # The name DuckDB gives a file it opens itself (its stem), unless that is one of its own catalogs.
        stem = Path(path).stem
        alias = '"' + stem.replace('"', '""') + '"' if stem.lower() not in ("", "memory", "system", "temp") \
            else "ledger"
        con.execute(_attach_statement(path, alias, read_only))
        con.execute(f"USE {alias}")
    except BaseException:
        con.close()
        raise
    return con


def close_connection(path: str, con: duckdb.DuckDBPyConnection) -> None:
    try:
        if id(con) in _dedicated:
            _dedicated.discard(id(con))
            con.close()
        else:
            _attachments.detach(path, con)
    finally:
        _lock_for(path).release()


class _Attachments:
    """Ledger files attached to one in-memory DuckDB instance per process.

    Creating a DuckDB instance costs 15-20 ms here (even for ``:memory:``);
    attaching a file to a live one costs about 1 ms, and detaching it releases
    the file's lock just as closing would. A batch opens its ledger a few times
    (the writer's leases, reads), so parroles keeps one instance and attaches.
    Callers hold the file's path lock; a thread that re-enters shares the
    attachment, which is detached when its last user closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instance: duckdb.DuckDBPyConnection | None = None
        self._users: dict[str, tuple[str, bool, int]] = {}  # path -> (alias, read_only, open connections)
        self._left: dict[str, tuple[int, ...] | None] = {}  # path -> the file as this process last left it intact
        self._intact: set[str] = set()  # paths attached for writing and checked intact (or found as left)

    def attach(self, path: str, read_only: bool) -> duckdb.DuckDBPyConnection:
        with self._lock:
            if self._instance is None:
                import duckdb

                self._instance = duckdb.connect(":memory:", config=dict(READ_WRITE_CONFIG))
            con = self._instance.cursor()
        alias, attached_read_only, users = self._users.get(path, (_alias(path), read_only, 0))
        try:
            if users == 0:
                # A DETACH that failed (a full disk) may have left the file attached: start clean.
                con.execute(f"DETACH DATABASE IF EXISTS {alias}")
                left = self._left.pop(path, None)
                con.execute(_attach_statement(path, alias, read_only))
                if not read_only and left is not None and _file_state(path) == left:
                    self._intact.add(path)
            elif attached_read_only and not read_only:
                raise LedgerError(f"ledger {path} is open read-only in this thread; it cannot be written too")
            con.execute(f"USE {alias}")
        except BaseException:
            con.close()
            raise
        self._users[path] = (alias, attached_read_only, users + 1)
        return con

    def detach(self, path: str, con: duckdb.DuckDBPyConnection) -> None:
        alias, read_only, users = self._users[path]
        try:
            if users == 1:
                intact = path in self._intact
                self._intact.discard(path)
                con.execute("USE memory")
                con.execute(f"DETACH {alias}")
                if intact:  # checked intact as it was attached, then written by DuckDB alone
                    self._left[path] = _file_state(path)
        finally:
            con.close()
            if users == 1:
                del self._users[path]
            else:
                self._users[path] = (alias, read_only, users - 1)

    def forget(self) -> None:
        """In a forked child: the parent's instance and attachments are not the child's to use.

        The inherited instance is kept referenced: destroying it in the child
        would run DuckDB's destructor without the threads it belongs to.
        """
        _inherited.append(self._instance)
        self._lock = threading.Lock()
        self._instance = None
        self._users = {}
        self._left, self._intact = {}, set()

    def intact(self, path: str) -> bool:
        """Whether ``path``, attached for writing, is known intact: checked so since it was attached, or found
        exactly as this process left it after writing it (same file, size and times: nobody wrote it since)."""
        return path in self._intact

    def checked_intact(self, path: str) -> None:
        self._intact.add(path)

    def distrust(self, path: str) -> None:
        """DuckDB met an error on ``path``: the file is checked again at its next open (a file damaged while
        attached, by another hand, is not taken for the one this process checked)."""
        self._intact.discard(path)
        self._left.pop(path, None)


def _file_state(path: str) -> tuple[int, ...] | None:
    try:
        state = os.stat(path)
    except OSError:
        return None
    return (state.st_dev, state.st_ino, state.st_size, state.st_mtime_ns, state.st_ctime_ns)


def known_intact(path: str) -> bool:
    """Whether ``path``, attached for writing in this process, is known intact (``_Attachments.intact``)."""
    return _attachments.intact(path)


def mark_intact(path: str) -> None:
    """``path``, attached for writing, was checked intact (``ledger.integrity``)."""
    _attachments.checked_intact(path)


def _alias(path: str) -> str:
    return "ledger_" + hashlib.sha256(path.encode()).hexdigest()[:16]


_attachments = _Attachments()
_inherited: list[Any] = []  # instances of the parent process, in a forked child: never used, never freed
_dedicated: set[int] = set()  # ids of the connections that have an instance of their own


def _forget_after_fork() -> None:
    global _path_locks_guard
    _attachments.forget()
    _path_locks.clear()
    _path_locks_guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


@contextlib.contextmanager
def translating(path: str) -> Iterator[None]:
    """Raise DuckDB errors met inside as LedgerErrors."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        _attachments.distrust(path)
        raise translate(exc, path) from exc


@contextlib.contextmanager
def connect(
    path: str, *, read_only: bool, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, config: dict[str, Any] | None = None
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

    def __init__(self, path: str, busy_timeout: float, stop: threading.Event | None = None) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.stop = stop  # set: stop waiting for another process's lock
        self._con: duckdb.DuckDBPyConnection | None = None
        self._opened = 0.0
        self._closed = -GAP

    @property
    def held(self) -> bool:
        return self._con is not None

    def connection(self, urgent: bool, wait: float | None = None) -> duckdb.DuckDBPyConnection:
        """The open connection, or a new one that waits ``wait`` (default ``busy_timeout``) for a lock."""
        if self._con is None:
            gap = self._closed + GAP - time.monotonic()
            if gap > 0 and not urgent:
                time.sleep(gap)  # the readers' turn: a gap after a full lease
            busy_timeout = self.busy_timeout if wait is None else wait
            self._con = open_connection(self.path, read_only=False, busy_timeout=busy_timeout, stop=self.stop)
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
