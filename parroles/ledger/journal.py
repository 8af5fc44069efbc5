"""The ledger's journal: where records are durable before DuckDB has them.

The ledger writer appends every group of records it takes to its journal
*before* it commits them to the DuckDB file, and empties the journal once
they are committed. So a record the writer has taken survives a busy file, a
full disk that frees up later, and the death of the process; the next
writable open of the ledger applies what a journal still holds.

Files: ``<ledger>.<id>.journal`` beside the ledger, one per open writer, held
with an exclusive ``flock`` for as long as that writer has it open. A journal
whose lock can be taken belongs to no live writer (its process ended, or
closed it with records it could not commit): ``orphaned_journals`` hands it to
the next writable open, which applies it and deletes it. A new journal is
written under a temporary name and renamed once locked, so nobody ever sees
an unlocked journal of a live writer.

Format, version 2::

    header   b"PARROLES-JOURNAL 2\n"
    entry    frame | payload
    frame    length of the payload (uint32 LE, never 0) | CRC-32 of the payload (uint32 LE)
             | CRC-32 of the eight bytes before it (uint32 LE)
    payload  marshal (format 4) of ``Pending.to_plain()``: dicts, lists,
             tuples, strings, numbers, booleans and None only

marshal, not JSON: measured here, JSON costs 4.4 us per run transition and
1.7 us per event, marshal 0.19 and 0.08 us. Only entries whose checksum
matches are unmarshalled.

Damage and a torn tail can never be taken for each other: the frame checks
itself, so a damaged length is damage, not an entry that seems to run past
the end of the file. Only two things end a journal quietly (``torn``): an
entry with a sound frame cut short by the end of the file, or a tail of
zero bytes (a frame is never all zeros: its length is never 0), which is
what a crash while the file grew, or a file system's preallocation, leaves.
Anything else that does not check (a frame or a payload whose checksum
fails, wherever it is, the last entry too) is damage: applied up to it,
kept aside as ``.damaged``, and said.

Version 1 journals (a frame of length and payload CRC only, written by
parroles before the frame checked itself) are still read and applied, with
the rules that format allows: an entry whose length runs past the end of the
file is taken for a torn tail there.

Nothing here opens DuckDB: ``ledger.commit`` applies what is read here (for ``ledger.writer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import marshal
import os
import re
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator

from parroles.ledger.pending import Pending

HEADER = b"PARROLES-JOURNAL 2\n"
HEADER_V1 = b"PARROLES-JOURNAL 1\n"
MARSHAL_FORMAT = 4
_FRAME = struct.Struct("<III")  # payload length, CRC-32 of the payload, CRC-32 of those eight bytes
_FRAME_V1 = struct.Struct("<II")  # payload length, CRC-32 of the payload
_NAME_TAIL = r"\.[0-9a-f]{12}\.journal"  # what follows the ledger's file name: see Journal._open_locked


def encode(pending: Pending) -> bytes:
    """One journal entry holding ``pending``."""
    return frame(marshal.dumps(pending.to_plain(), MARSHAL_FORMAT))


def frame(payload: bytes) -> bytes:
    """``payload`` behind a frame that checks itself (a payload is never empty: marshal writes a type byte)."""
    sizes = _FRAME_V1.pack(len(payload), zlib.crc32(payload))
    return sizes + struct.pack("<I", zlib.crc32(sizes)) + payload


@dataclasses.dataclass(frozen=True)
class JournalContents:
    entries: list[Pending]
    torn: bool = False  # it ends in an entry cut short, or in zeros (its writer died writing): ignored
    damaged_at: int | None = None  # where an entry that does not check starts: it and the rest are not applied
    foreign: bool = False  # not a journal this version of parroles reads

    @property
    def records(self) -> int:
        return sum(entry.rows() for entry in self.entries)


def read_journal(data: bytes) -> JournalContents:
    """The entries of a journal file's bytes, up to the first that does not check or the end."""
    if data.startswith(HEADER):
        return _read_entries(data, len(HEADER), _entry_at)
    if data.startswith(HEADER_V1):
        return _read_entries(data, len(HEADER_V1), _entry_at_v1)
    # A header cut short is a journal that died before its first entry.
    torn = HEADER.startswith(data) or HEADER_V1.startswith(data)
    return JournalContents([], torn=True) if torn else JournalContents([], foreign=True)


class _Torn(Exception):
    """The entry here is the tail its writer was writing when it died."""


class _Damaged(Exception):
    """The bytes here are no whole, sound entry, and cannot be a torn tail."""


def _read_entries(data: bytes, offset: int,
                  entry_at: Callable[[bytes, int], tuple[Pending, int]]) -> JournalContents:
    entries: list[Pending] = []
    while offset < len(data):
        try:
            entry, offset_after = entry_at(data, offset)
        except _Torn:
            return JournalContents(entries, torn=True)
        except _Damaged:
            if not data[offset:].strip(b"\0"):  # looked at once, here: per entry, it made reading quadratic
                return JournalContents(entries, torn=True)  # zeros: grown or preallocated, never written
            return JournalContents(entries, damaged_at=offset)
        entries.append(entry)
        offset = offset_after
    return JournalContents(entries)


def _entry_at(data: bytes, offset: int) -> tuple[Pending, int]:
    """The entry at ``offset`` and where it ends (version 2)."""
    if offset + _FRAME.size > len(data):
        raise _Torn
    length, crc, frame_crc = _FRAME.unpack_from(data, offset)
    if length == 0 or zlib.crc32(data[offset:offset + _FRAME_V1.size]) != frame_crc:
        raise _Damaged
    return _payload(data, offset + _FRAME.size, length, crc)


def _entry_at_v1(data: bytes, offset: int) -> tuple[Pending, int]:
    """The entry at ``offset`` and where it ends (version 1: a damaged length reads as a torn tail)."""
    if offset + _FRAME_V1.size > len(data):
        raise _Torn
    length, crc = _FRAME_V1.unpack_from(data, offset)
    return _payload(data, offset + _FRAME_V1.size, length, crc)


def _payload(data: bytes, start: int, length: int, crc: int) -> tuple[Pending, int]:
    end = start + length
    if end > len(data):
        raise _Torn  # cut short by the end of the file
    payload = data[start:end]
    if zlib.crc32(payload) != crc:
        raise _Damaged
    try:
        return Pending.from_plain(marshal.loads(payload)), end
    except (ValueError, EOFError, TypeError, KeyError, AttributeError):
        raise _Damaged from None  # its checksum matches, but it is no journal entry


def journal_paths(ledger_path: str) -> list[str]:
    """Every journal of the ledger at ``ledger_path`` (and of no other ledger), oldest first.

    Matched by exact name, not a glob: ``*`` would match dots, so the ledger
    ``runs`` would take the journals of ``runs.duckdb`` for its own. Named
    after the ledger's real path, so a ledger opened through a symlink and
    through its target has one set of journals.
    """
    folder, name = os.path.split(os.path.realpath(ledger_path))
    own = re.compile(re.escape(name) + _NAME_TAIL)
    try:
        names = [entry for entry in os.listdir(folder) if own.fullmatch(entry)]
    except OSError:
        return []
    return sorted((os.path.join(folder, entry) for entry in names), key=_mtime)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def pending_records(ledger_path: str) -> int:
    """Records that journals of this ledger hold, live or not (what readers do not see yet)."""
    total = 0
    for path in journal_paths(ledger_path):
        with contextlib.suppress(OSError):
            with open(path, "rb") as journal:
                total += read_journal(journal.read()).records
    return total


@dataclasses.dataclass
class OrphanedJournal:
    """A journal no live writer holds, locked by us until ``discard``."""

    path: str
    fd: int
    contents: JournalContents

    def discard(self) -> None:
        """Its entries are in the ledger now: delete it, then let go of its lock."""
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)

    def set_aside(self) -> str:
        """Keep it, damaged, where no open applies it again: ``<path>.damaged``; returns that path."""
        kept = self.path + ".damaged"
        try:
            os.rename(self.path, kept)
        finally:
            os.close(self.fd)
        return kept

    def release(self) -> None:
        """Keep it (its entries could not be applied) for a later open."""
        os.close(self.fd)


def orphaned_journals(ledger_path: str) -> Iterator[OrphanedJournal]:
    """Journals of the ledger whose writer is gone, each locked (and read) while the caller applies it."""
    for path, fd in _unheld(ledger_path):
        try:
            with open(fd, "rb", closefd=False) as journal:
                contents = read_journal(journal.read())
        except BaseException:
            os.close(fd)
            raise
        yield OrphanedJournal(path, fd, contents)


def _unheld(ledger_path: str) -> Iterator[tuple[str, int]]:
    """Each journal no live writer holds, and a descriptor of it holding its lock (the caller closes it)."""
    for path in journal_paths(ledger_path):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # applied and deleted by another process meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:
                raise BlockingIOError("already applied and deleted")
        except OSError:  # a live writer holds it, or it was deleted under us
            os.close(fd)
            continue
        yield path, fd


class Journal:
    """The journal of one ledger writer. Thread-safe; created on the first append.

    ``append`` writes an entry to the OS (no fsync); ``sync`` makes what was
    appended durable on disk; ``clear`` empties it once its records are
    committed. An append that fails (disk full, folder not writable) keeps
    the entry in memory and writes it, in order, before the next one.
    """

    def __init__(self, ledger_path: str) -> None:
        self.ledger_path = os.path.realpath(ledger_path)  # see journal_paths
        self.path: str | None = None
        self.error: Exception | None = None  # why the last append failed, until one succeeds
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0  # where the next entry goes: the end of the last whole one
        self._unwritten: list[bytes] = []
        self._unencodable = False  # an entry could not be encoded: the journal misses records until cleared
        _open_journals.add(self)

    @property
    def durable(self) -> bool:
        """Every entry appended so far reached the OS."""
        return not self._unwritten and not self._unencodable

    def append_records(self, pending: Pending) -> bool:
        """Append ``pending`` as one entry; False if it cannot be journaled (it stays the caller's, in memory)."""
        try:
            entry = encode(pending)
        except ValueError as exc:  # a value marshal cannot store: a bug upstream, never a reason to lose records
            with self._lock:
                self.error, self._unencodable = exc, True
            return False
        return self.append(entry)

    def append(self, entry: bytes) -> bool:
        """Write ``entry`` (after any that an earlier failure left unwritten); False if it cannot be."""
        with self._lock:
            self._unwritten.append(entry)
            try:
                fd = self._open_locked()
                data = b"".join(self._unwritten)
                # At the end of the last whole entry: a torn write of an earlier
                # try is overwritten by the same bytes and more.
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, memoryview(data)[written:], self._size + written)
            except OSError as exc:
                self.error = exc
                return False
            self._size += len(data)
            self._unwritten.clear()
            if not self._unencodable:
                self.error = None
            return True

    def sync(self) -> None:
        """fsync what was appended (an error is kept in ``error``)."""
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self.error = exc

    def clear(self) -> None:
        """Every entry is committed to the ledger: empty the journal."""
        with self._lock:
            self._unwritten.clear()
            self._unencodable, self.error = False, None
            if self._fd is not None and self._size > len(HEADER):
                try:
                    os.ftruncate(self._fd, len(HEADER))
                except OSError as exc:  # the old entries stay; applying them again changes nothing
                    self.error = exc
                    return
                self._size = len(HEADER)

    def close(self) -> None:
        """Delete the journal if it is empty; else make it durable and leave it for the next open."""
        with self._lock:
            _open_journals.discard(self)
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if self._size <= len(HEADER) and self.path is not None:
                    os.unlink(self.path)
                else:
                    os.fsync(fd)
            except OSError as exc:
                self.error = exc
            finally:
                os.close(fd)

    def _open_locked(self) -> int:
        if self._fd is not None:
            return self._fd
        final = f"{self.ledger_path}.{uuid.uuid4().hex[:12]}.journal"
        temporary = final + ".new"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, HEADER)
            os.rename(temporary, final)  # visible to others only once it is locked
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self._fd, self._size, self.path = fd, len(HEADER), final
        return fd

    def _forget_in_child(self) -> None:
        # A forked child shares the lock with us; closing its copy of the
        # descriptor lets the lock go when *we* let it go, not when the child ends.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
        self._lock = threading.Lock()


_open_journals: set[Journal] = set()


def _forget_after_fork() -> None:
    for journal in list(_open_journals):
        journal._forget_in_child()
    _open_journals.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def orphaned_count(ledger_path: str) -> int:
    """How many journals of this ledger no live writer holds (their locks tried, none kept, none read)."""
    count = 0
    for _, fd in _unheld(ledger_path):
        os.close(fd)
        count += 1
    return count

