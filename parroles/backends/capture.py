"""Runs in worker processes: what a role writes to its stdout and stderr, captured at the file descriptors.

While a role runs, fd 1 and fd 2 of its worker are pipes of its own, so
``print``, ``sys.stderr``, ``logging``, ``os.write(1, ...)``, C extensions and
the child processes that inherit them are all captured. One reader thread per
worker process (started once: a thread per role cost more than a no-op role)
splits what arrives into lines (one longer than ``LINE_LIMIT`` characters is
split), numbers them per run, and hands them to the role's ``send`` in
batches, never one message per line. When the role ends, Python's buffers
are flushed, the descriptors are given back, and the reader drains the
role's pipes and sends the rest before the role's end is reported; then the
pipes are closed, so whatever a leftover process writes is never read into
another role's run. At most ``max_bytes`` are kept per run; past that, one
marker line says how much was dropped and the role goes on.

A process captures one role at a time (a loky worker, a single-threaded Dask worker).
"""

from __future__ import annotations

import os
import queue
import selectors
import sys
import threading
import time
from collections.abc import Callable

LINE_LIMIT = 16_384  # characters; a longer line is kept as several
BATCH_LINES = 1_000  # lines a batch holds at most before it is sent
BATCH_SECONDS = 0.1  # how long a line may wait to be sent
READ_BYTES = 65_536
DRAIN_TIMEOUT = 10.0  # a role's end waits at most this long for its lines to be read
DRAIN_READS = 256  # reads of a pipe at a role's end, at most (16 MiB): the rest is a leftover writer's
STREAMS = {1: "stdout", 2: "stderr"}

LogLine = tuple[int, str, str, float]  # seq, stream, line, ts
Send = Callable[[list[LogLine]], None]


class _RoleOutput:
    """One role's pipes and lines; touched by the reader thread only, once begun."""

    def __init__(self, send: Send, max_bytes: int) -> None:
        self.send = send
        self.max_bytes = max_bytes
        self.streams: dict[int, str] = {}  # read end -> "stdout" / "stderr"
        self.partial: dict[int, bytes] = {}
        self.batch: list[LogLine] = []
        self.first_waiting = 0.0
        self.seq = self.kept = self.dropped_bytes = self.dropped_lines = 0
        self.dropping: set[int] = set()  # read ends whose current line has lost bytes (counted already)
        self.drained = threading.Event()
        self.lock = threading.Lock()  # held by the reader while it reads a pipe and keeps what it read
        self.silent_end = False  # ended with nothing left to read: the reader only closes its pipes
        self.at_eof: set[int] = set()  # read ends whose writers all closed (unregistered, closed at the end)

    def take(self, read_end: int, data: bytes) -> None:
        if self.kept >= self.max_bytes:  # past the cap: count what is dropped, keep nothing
            pieces = (self.partial[read_end] + data).split(b"\n")
            self.partial[read_end] = b""
            for index, piece in enumerate(pieces):
                ends = index < len(pieces) - 1
                if piece or ends:
                    self.drop(read_end, len(piece), ends)
            return
        *lines, rest = (self.partial[read_end] + data).split(b"\n")
        for line in lines:
            self.add_line(read_end, line, ends=True)
        while len(rest) > LINE_LIMIT:  # a line without its end yet: never hold more than a line's worth
            self.add_line(read_end, rest[:LINE_LIMIT], ends=False)
            rest = rest[LINE_LIMIT:]
        self.partial[read_end] = rest
        if len(self.batch) >= BATCH_LINES:
            self.flush()

    def add_line(self, read_end: int, raw: bytes, ends: bool) -> None:
        """Keep ``raw``, a line or (``ends`` False) a piece of one, unless it would pass the cap."""
        if self.kept + len(raw) > self.max_bytes:
            self.drop(read_end, len(raw), ends)
            return
        self.kept += len(raw) + ends
        text = raw.decode("utf-8", errors="replace")
        for start in range(0, max(len(text), 1), LINE_LIMIT):
            self.append(self.streams[read_end], text[start:start + LINE_LIMIT])

    def drop(self, read_end: int, size: int, ends: bool) -> None:
        """Count ``size`` bytes (and the newline, if ``ends``) dropped; a line counts once, however it was cut."""
        self.dropped_bytes += size + ends
        if read_end not in self.dropping:
            self.dropped_lines += 1
            self.dropping.add(read_end)
        if ends:
            self.dropping.discard(read_end)

    def append(self, stream: str, line: str) -> None:
        if not self.batch:
            self.first_waiting = time.monotonic()
        self.seq += 1
        self.batch.append((self.seq, stream, line, time.time()))

    def finish(self) -> None:
        for read_end, rest in self.partial.items():
            if rest:
                self.add_line(read_end, rest, ends=False)
        if self.dropped_bytes:
            lines = f"{self.dropped_lines} line{'s' if self.dropped_lines != 1 else ''}"
            self.append("stderr", f"[parroles: {self.dropped_bytes} bytes in {lines} dropped "
                                  f"past the limit of {self.max_bytes} bytes]")
        self.flush()

    def flush(self) -> None:
        if self.batch:
            batch, self.batch = self.batch, []
            self.send(batch)


class OutputCapture:
    """The worker's capture: ``begin`` as a role starts, ``end`` as it ends (before its end is reported)."""

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[tuple[str, _RoleOutput]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        self._thread: threading.Thread | None = None
        self._saved: dict[int, int] = {}  # fd -> a copy of what it was before the role
        self._current: _RoleOutput | None = None

    def begin(self, send: Send, max_bytes: int) -> None:
        _flush_python()
        role = self._current = _RoleOutput(send, max_bytes)
        for fd, stream in STREAMS.items():
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            role.streams[read_end], role.partial[read_end] = stream, b""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name="parroles-capture", daemon=True)
            self._thread.start()
        self._command("begin", role)

    def end(self) -> None:
        """Flush, give the descriptors back, and wait until every line the role wrote is sent."""
        role, self._current = self._current, None
        if role is None:
            return
        _flush_python()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our pipes' write ends in fds 1 and 2 are closed by this
            os.close(saved)
        self._saved.clear()
        with role.lock:
            # Most roles print nothing: then their end needs no round trip through the reader thread.
            role.silent_end = not self._read_left(role) and not role.batch and not any(role.partial.values()) \
                and not role.dropped_bytes
        self._command("end", role)
        if not role.silent_end:
            role.drained.wait(DRAIN_TIMEOUT)

    @staticmethod
    def _read_left(role: _RoleOutput) -> bool:
        """Under the role's lock: read once from each of its pipes; True if that found output."""
        found = False
        for read_end in role.streams:
            if read_end in role.at_eof:
                continue
            try:
                data = os.read(read_end, READ_BYTES)
            except BlockingIOError:
                continue  # empty: the only writers left are processes it left behind
            if data:
                role.take(read_end, data)
                found = True
        return found

    def _command(self, what: str, role: _RoleOutput) -> None:
        self._commands.put((what, role))
        os.write(self._wake_write, b"x")

    # -- the reader thread -----------------------------------------------------------------

    def _read_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        owner: dict[int, _RoleOutput] = {}  # read end -> its role
        while True:
            waiting = [role for role in set(owner.values()) if role.batch]
            timeout = BATCH_SECONDS if waiting else None
            for key, _ in selector.select(timeout):
                if key.fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    self._obey(selector, owner)
                elif key.fd in owner:
                    self._read_locked(selector, owner, key.fd)
            now = time.monotonic()
            for role in set(owner.values()):
                if role.batch and now - role.first_waiting >= BATCH_SECONDS:
                    role.flush()

    def _obey(self, selector: selectors.BaseSelector, owner: dict[int, _RoleOutput]) -> None:
        while True:
            try:
                what, role = self._commands.get_nowait()
            except queue.Empty:
                return
            if what == "begin":
                for read_end in role.streams:
                    selector.register(read_end, selectors.EVENT_READ)
                    owner[read_end] = role
                continue
            for read_end in role.streams:  # "end": read what is there now, then close (only here)
                reads = 0  # bounded: a leftover process may never stop writing
                while not role.silent_end and reads < DRAIN_READS and self._read(selector, owner, read_end):
                    reads += 1
                if read_end not in role.at_eof:
                    selector.unregister(read_end)
                owner.pop(read_end, None)
                os.close(read_end)
            if not role.silent_end:
                role.finish()
            role.drained.set()

    def _read(self, selector: selectors.BaseSelector, owner: dict[int, _RoleOutput], read_end: int) -> bool:
        """Read once from ``read_end``; False when nothing more is there now (or ever)."""
        role = owner[read_end]
        if read_end in role.at_eof:
            return False
        try:
            data = os.read(read_end, READ_BYTES)
        except BlockingIOError:
            return False
        if not data:  # every writer closed it: stop watching it (the role's end closes it)
            selector.unregister(read_end)
            role.at_eof.add(read_end)
            return False
        role.take(read_end, data)
        return True

    def _read_locked(self, selector: selectors.BaseSelector, owner: dict[int, _RoleOutput], read_end: int) -> None:
        role = owner[read_end]
        with role.lock:
            if not role.silent_end:  # after a silent end, what comes is a leftover's: never read
                self._read(selector, owner, read_end)


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader left
            pass


_capture: OutputCapture | None = None


def worker_capture() -> OutputCapture:
    """This worker process's capture (made on first use)."""
    global _capture
    if _capture is None:
        _capture = OutputCapture()
    return _capture
