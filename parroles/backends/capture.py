"""Runs in worker processes: what a role writes to its stdout and stderr, captured at the file descriptors.

While a role runs, fd 1 and fd 2 of its worker are the write ends of two
pipes, so ``print``, ``sys.stderr``, ``logging``, ``os.write(1, ...)``, C
extensions and the child processes that inherit them are all captured. The
pipes and one reader thread are made once per worker process and serve role
after role: a role's start points fds 1 and 2 at them and says whose lines
they now are, its end gives the descriptors back. The reader splits what
arrives into lines (one longer than ``LINE_LIMIT`` characters is split),
numbers them per run, and hands them to the role's ``send`` in batches, never
one message per line. At most ``max_bytes`` are kept per run; past that, one
marker line says how much was dropped and the role goes on.

Every line a role wrote is sent before its end is reported. At the end,
Python's buffers are flushed and the descriptors given back; then no one
writes to the pipes any more, so an empty pipe is the end of the role's
lines (the marker the issue asked for, without writing one): the calling
thread reads the pipes until they are empty, under the lock the reader
thread reads under, and sends the rest. That holds only while no process the
role started may still write to them: when one may (``containment``), the
role's pipes are retired as it ends instead (read once more by the reader,
then closed, so a leftover writer never reaches another role's run) and the
next role gets new ones. A role that prints nothing pays four ``dup2``, a
``poll`` and a ``waitid``, and wakes no thread.

A process captures one role at a time (a loky worker, a single-threaded Dask worker).
"""

from __future__ import annotations

import os
import queue
import select
import selectors
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from parroles.backends import containment

LINE_LIMIT = 16_384  # characters; a longer line is kept as several
BATCH_LINES = 1_000  # lines a batch holds at most before it is sent
BATCH_SECONDS = 0.1  # how long a line may wait to be sent
READ_BYTES = 65_536
DRAIN_TIMEOUT = 10.0  # a role's end waits at most this long for its lines to be read
DRAIN_READS = 256  # reads of a pipe at a role's end, at most (16 MiB): the rest is a leftover writer's
STREAMS = {1: "stdout", 2: "stderr"}
_FD_OF = {name: fd for fd, name in STREAMS.items()}

LogLine = tuple[int, str, str, float]  # seq, stream, line, ts
Send = Callable[[list[LogLine]], None]


class _RoleOutput:
    """One role's lines; touched only under the capture's lock once its role began."""

    def __init__(self, send: Send, max_bytes: int, streams: dict[int, str]) -> None:
        self.send = send
        self.max_bytes = max_bytes
        self.streams = streams  # read end -> "stdout" / "stderr"
        self.partial = dict.fromkeys(streams, b"")
        self.batch: list[LogLine] = []
        self.first_waiting = 0.0
        self.seq = self.kept = self.dropped_bytes = self.dropped_lines = 0
        self.dropping: set[int] = set()  # read ends whose current line has lost bytes (counted already)
        self.drained: threading.Event | None = None  # set once its lines are all sent, when its pipes retire

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
            cut = _char_boundary(rest, LINE_LIMIT)
            self.add_line(read_end, rest[:cut], ends=False)
            rest = rest[cut:]
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


class _Pipes:
    """A stdout and a stderr pipe, and the role whose lines they carry now (None between roles)."""

    def __init__(self) -> None:
        self.write_ends: dict[int, int] = {}  # fd 1 or 2 -> its pipe's write end
        self.streams: dict[int, str] = {}  # read end -> "stdout" / "stderr"
        for fd, stream in STREAMS.items():
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            self.write_ends[fd], self.streams[read_end] = write_end, stream
        self.role: _RoleOutput | None = None
        self.ready = select.poll()  # which read ends hold something, in one system call
        for read_end in self.streams:
            self.ready.register(read_end, select.POLLIN)

    def close_write_ends(self) -> None:
        for write_end in self.write_ends.values():
            os.close(write_end)
        self.write_ends.clear()


class OutputCapture:
    """The worker's capture: ``begin`` as a role starts, ``end`` as it ends (before its end is reported)."""

    def __init__(self) -> None:
        self._commands: queue.SimpleQueue[tuple[str, _Pipes]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # held while a pipe is read and what was read is kept
        self._saved: dict[int, int] = {}  # fd 1 and 2 as they were before the first role
        self._pipes: _Pipes | None = None

    def begin(self, send: Send, max_bytes: int) -> None:
        _flush_python()
        if self._pipes is None:
            self._pipes = _Pipes()
            if self._thread is None:
                self._saved = {fd: os.dup(fd) for fd in STREAMS}
                self._thread = threading.Thread(target=self._read_loop, name="parroles-capture", daemon=True)
                self._thread.start()
            self._command("adopt", self._pipes)
        pipes = self._pipes
        role = _RoleOutput(send, max_bytes, pipes.streams)
        with self._lock:
            pipes.role = role
        for fd, write_end in pipes.write_ends.items():
            os.dup2(write_end, fd)

    def end(self) -> None:
        """Flush, give the descriptors back, and send every line the role wrote."""
        pipes = self._pipes
        role = pipes.role if pipes is not None else None
        if pipes is None or role is None:
            return
        _flush_python()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
        if containment.may_have_descendants():
            self._retire(pipes, role)
            return
        with self._lock:
            pipes.role = None
            for read_end, _ in pipes.ready.poll(0):
                reads = 0
                while reads < DRAIN_READS and self._read(read_end, role):
                    reads += 1
            role.finish()

    def _retire(self, pipes: _Pipes, role: _RoleOutput) -> None:
        """A process the role started may write on: its lines until now are its, then the pipes close."""
        self._pipes = None
        role.drained = threading.Event()
        pipes.close_write_ends()
        self._command("retire", pipes)
        role.drained.wait(DRAIN_TIMEOUT)

    @staticmethod
    def _read(read_end: int, role: _RoleOutput | None) -> bool:
        """Under the lock: read once from ``read_end`` into ``role`` (None: a leftover's, dropped); False when
        nothing more is there now (or ever)."""
        try:
            data = os.read(read_end, READ_BYTES)
        except BlockingIOError:
            return False
        if not data:
            return False
        if role is not None:
            role.take(read_end, data)
        return True

    def _command(self, what: str, pipes: _Pipes) -> None:
        self._commands.put((what, pipes))
        os.write(self._wake_write, b"x")

    # -- the reader thread -----------------------------------------------------------------

    def _read_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        owner: dict[int, _Pipes] = {}  # read end -> its pipes
        while True:
            waiting = [pipes.role for pipes in set(owner.values()) if pipes.role is not None and pipes.role.batch]
            for key, _ in selector.select(BATCH_SECONDS if waiting else None):
                if key.fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    self._obey(selector, owner)
                elif key.fd in owner:
                    self._read_now(selector, owner[key.fd], key.fd)
            now = time.monotonic()
            with self._lock:
                for role in waiting:
                    if role.batch and now - role.first_waiting >= BATCH_SECONDS:
                        role.flush()

    def _read_now(self, selector: selectors.BaseSelector, pipes: _Pipes, read_end: int) -> None:
        with self._lock:
            try:
                data = os.read(read_end, READ_BYTES)
            except BlockingIOError:
                return  # the role's end read it first
            if not data:  # every writer closed it: stop watching it (retiring closes it)
                selector.unregister(read_end)
                pipes.ready.unregister(read_end)
            elif pipes.role is not None:
                pipes.role.take(read_end, data)

    def _obey(self, selector: selectors.BaseSelector, owner: dict[int, _Pipes]) -> None:
        while True:
            try:
                what, pipes = self._commands.get_nowait()
            except queue.Empty:
                return
            if what == "adopt":
                for read_end in pipes.streams:
                    selector.register(read_end, selectors.EVENT_READ)
                    owner[read_end] = pipes
                continue
            self._retire_now(selector, owner, pipes)

    def _retire_now(self, selector: selectors.BaseSelector, owner: dict[int, _Pipes], pipes: _Pipes) -> None:
        """Read what is there now into the role (at most ``DRAIN_READS`` a pipe: a leftover may never stop), and
        close the pipes (only here, after they left the selector, so a new pipe never takes a watched number)."""
        with self._lock:
            role, pipes.role = pipes.role, None
            for read_end in pipes.streams:
                reads = 0
                while reads < DRAIN_READS and self._read(read_end, role):
                    reads += 1
                if read_end in selector.get_map():
                    selector.unregister(read_end)
                owner.pop(read_end, None)
                os.close(read_end)
        if role is not None:
            role.finish()
            if role.drained is not None:
                role.drained.set()


def _char_boundary(data: bytes, limit: int) -> int:
    """Where to cut ``data`` at ``limit`` bytes or just before, so that no UTF-8 character is cut in two
    (each piece is decoded on its own); ``limit`` itself when ``data`` is not UTF-8 there."""
    cut = limit
    while cut > limit - 3 and 0x80 <= data[cut] < 0xC0:  # a continuation byte: its character began before
        cut -= 1
    return limit if 0x80 <= data[cut] < 0xC0 else cut  # four continuation bytes in a row: not UTF-8


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - closed, a pipe whose reader left, or whatever a role put there
            pass


# The worker's own sys.stdout and sys.stderr, as they were before its first role.
_streams: dict[str, TextIO] = {}


def keep_streams() -> None:
    """Remember the worker's own streams (as a role is about to start; once per process)."""
    if not _streams:
        _streams.update(stdout=sys.stdout, stderr=sys.stderr)


def put_streams_back() -> None:
    """As a role ends: a role that replaced ``sys.stdout`` or ``sys.stderr`` and left it so, or closed it,
    does not silence the roles after it on this worker; each starts with the worker's own streams, open."""
    for name, stream in _streams.items():
        if getattr(stream, "closed", False):  # closed by a role; its descriptor is not (std streams keep it)
            stream = _streams[name] = _reopened(stream, _FD_OF[name])
            if getattr(getattr(sys, f"__{name}__", None), "closed", False):
                setattr(sys, f"__{name}__", stream)
        if getattr(sys, name) is not stream:
            setattr(sys, name, stream)


def _reopened(stream: TextIO, fd: int) -> TextIO:
    """A new text stream on ``fd`` (that of closed ``stream``), written the same way."""
    fresh = open(fd, "w", encoding=getattr(stream, "encoding", None),
                 errors=getattr(stream, "errors", None), closefd=False)
    fresh.reconfigure(line_buffering=getattr(stream, "line_buffering", False))
    return fresh


_capture: OutputCapture | None = None


def worker_capture() -> OutputCapture:
    """This worker process's capture (made on first use)."""
    global _capture
    if _capture is None:
        _capture = OutputCapture()
    return _capture
