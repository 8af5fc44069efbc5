"""Runs in worker processes: what a role writes to its stdout and stderr, captured at the file descriptors.

While a role runs, fd 1 and fd 2 of its worker are pipes, so ``print``,
``sys.stderr``, ``logging``, ``os.write(1, ...)``, C extensions and the child
processes that inherit them are all captured. One reader thread splits what
arrives into lines (a line longer than ``LINE_LIMIT`` characters is split),
numbers them per run, and hands them to ``send`` in batches, never one
message per line. When the role ends, Python's own buffers are flushed, the
descriptors are given back, and what is left in the pipes is read and sent
before the role's end is reported; whatever a leftover process writes after
that is never read into another role's run (its pipe is closed). At most
``max_bytes`` are kept per run; past that, one marker line says how much was
dropped and the role goes on.
"""

from __future__ import annotations

import os
import selectors
import sys
import threading
import time
from collections.abc import Callable

LINE_LIMIT = 16_384  # characters; a longer line is kept as several
BATCH_LINES = 1_000  # lines a batch holds at most before it is sent
BATCH_SECONDS = 0.1  # how long a line may wait to be sent
READ_BYTES = 65_536
STREAMS = {1: "stdout", 2: "stderr"}

LogLine = tuple[int, str, str, float]  # seq, stream, line, ts
Send = Callable[[list[LogLine]], None]


class OutputCapture:
    """One role's stdout and stderr, from ``start`` to ``stop``: one per role, one role at a time per worker."""

    def __init__(self, send: Send, max_bytes: int) -> None:
        self._send = send
        self._max_bytes = max_bytes
        self._pipes: dict[int, str] = {}  # read end -> the stream it carries
        self._saved: dict[int, int] = {}  # fd -> a copy of what it was before the role
        self._partial: dict[int, bytes] = {}
        self._batch: list[LogLine] = []
        self._first_waiting = 0.0
        self._seq = 0
        self._kept = 0
        self._dropped_bytes = 0
        self._dropped_lines = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stop_read, self._wake = os.pipe()

    def start(self) -> None:
        _flush_python()
        for fd in STREAMS:
            read_end, write_end = os.pipe()
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            self._pipes[read_end] = STREAMS[fd]
            self._partial[read_end] = b""
        self._reader = threading.Thread(target=self._read_loop, name="parroles-capture", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Flush, give the descriptors back, read what is left, send it all."""
        _flush_python()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # our pipes' write ends in fds 1 and 2 are closed by this
            os.close(saved)
        self._saved.clear()
        os.write(self._wake, b"x")  # leftover writers may keep a pipe open: read what is there, then stop
        if self._reader is not None:
            self._reader.join()
        with self._lock:
            for read_end, rest in self._partial.items():
                if rest:
                    self._add_line(read_end, rest)
            if self._dropped_bytes:
                self._append("stderr", f"[parroles: {self._dropped_bytes} bytes in {self._dropped_lines} lines "
                                       f"dropped past the limit of {self._max_bytes} bytes]")
            self._flush_batch()
        for fd in (*self._pipes, self._stop_read, self._wake):
            os.close(fd)

    # -- the reader thread -----------------------------------------------------------------

    def _read_loop(self) -> None:
        selector = selectors.DefaultSelector()
        for read_end in self._pipes:
            selector.register(read_end, selectors.EVENT_READ)
        selector.register(self._stop_read, selectors.EVENT_READ)
        stopping = False
        open_ends = set(self._pipes)
        while open_ends:
            timeout = 0 if stopping else (BATCH_SECONDS if self._batch else None)
            ready = selector.select(timeout)
            if not ready:
                if stopping:
                    break  # drained: what comes later is a leftover's, never read into a run
                with self._lock:
                    self._flush_batch()
                continue
            for key, _ in ready:
                if key.fd == self._stop_read:
                    os.read(self._stop_read, 1)
                    stopping = True
                    continue
                data = os.read(key.fd, READ_BYTES)
                if not data:
                    selector.unregister(key.fd)
                    open_ends.discard(key.fd)
                    continue
                self._take(key.fd, data)
        selector.close()

    def _take(self, read_end: int, data: bytes) -> None:
        with self._lock:
            *lines, rest = (self._partial[read_end] + data).split(b"\n")
            self._partial[read_end] = rest
            for line in lines:
                self._add_line(read_end, line)
            if len(self._batch) >= BATCH_LINES or (self._batch and time.monotonic() - self._first_waiting
                                                   >= BATCH_SECONDS):
                self._flush_batch()

    def _add_line(self, read_end: int, raw: bytes) -> None:
        if self._kept + len(raw) > self._max_bytes:
            self._dropped_bytes += len(raw) + 1
            self._dropped_lines += 1
            return
        self._kept += len(raw) + 1
        text = raw.decode("utf-8", errors="replace")
        stream = self._pipes[read_end]
        for start in range(0, max(len(text), 1), LINE_LIMIT):
            self._append(stream, text[start:start + LINE_LIMIT])

    def _append(self, stream: str, line: str) -> None:
        if not self._batch:
            self._first_waiting = time.monotonic()
        self._seq += 1
        self._batch.append((self._seq, stream, line, time.time()))

    def _flush_batch(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._send(batch)


def _flush_python() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader left
            pass
