"""Parent end of the worker channel: one Unix socket that every worker joins once.

Workers send ``Hello``, ``Started``, ``Event`` and ``Finished`` messages
(``protocol.to_wire``; loky's own, ``Hello``, ``Cancel`` and ``Sweep``, are in
``loky.messages``); the parent sends ``Cancel`` to the worker running a role,
``Sweep`` at a batch's end, and each batch's payload to every worker
once (a binary frame: ``BATCH_FRAME``, the batch key, the pickled payload).
Each connection has a reader thread, so a worker's messages arrive in the
order it sent them, and its end of the stream (EOF) says the worker process
is gone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener

from parroles.backends.loky.messages import CHANNEL_WIRE, ChannelMessage, Hello
from parroles.backends.protocol import from_wire, to_wire

BATCH_FRAME = b"\x00"  # JSON never starts with a NUL byte
FRAME_SEPARATOR = b"\n"  # between messages that cross in one frame (JSON as to_wire writes it has no newline)
OnMessage = Callable[[int, ChannelMessage], None]
OnGone = Callable[[int], None]


class Channel:
    """The parent's end: a listener every worker joins, and a reader thread per worker."""

    def __init__(self, on_message: OnMessage, on_gone: OnGone) -> None:
        self.authkey = os.urandom(32)
        self._listener = Listener(family="AF_UNIX", authkey=self.authkey)
        self.address: str = self._listener.address
        self._on_message = on_message
        self._on_gone = on_gone
        self._conns: dict[int, Connection] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closing = False
        self._accepter = threading.Thread(target=self._accept_loop, name="parroles-channel-accept", daemon=True)
        self._accepter.start()

    def send(self, pid: int, message: ChannelMessage) -> bool:
        """Send to the worker with ``pid``; False if it is not connected (any more)."""
        return self._send(pid, to_wire(message))

    def connected(self, pid: int) -> bool:
        """Whether the worker with ``pid`` is on the channel (its last messages may still be arriving if not)."""
        with self._lock:
            return pid in self._conns

    def send_batch(self, pid: int, key: str, payload: bytes) -> bool:
        """Give the worker with ``pid`` the payload of batch ``key``."""
        return self._send(pid, BATCH_FRAME + key.encode() + payload)

    def _send(self, pid: int, data: bytes) -> bool:
        with self._lock:
            conn = self._conns.get(pid)
        if conn is None:
            return False
        try:
            with self._send_lock:  # a payload and a cancel must not interleave on one socket
                conn.send_bytes(data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        with self._lock:
            self._closing = True
            conns = list(self._conns.values())
        # Wake the accept thread with a bare connection (its handshake fails at
        # once); closing the socket under a blocked accept() does not wake it on Linux.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as waker:
            waker.connect(self.address)
        self._accepter.join(timeout=5)
        self._listener.close()
        for conn in conns:
            conn.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):
                # A worker that died during the handshake, a stranger, or our own wake-up call.
                with self._lock:
                    if self._closing:
                        return
                continue
            with self._lock:
                if self._closing:
                    conn.close()
                    return
            threading.Thread(target=self._read_loop, args=(conn,), name="parroles-channel-read", daemon=True).start()

    def _read_loop(self, conn: Connection) -> None:
        pid = None
        try:
            while True:
                for data in conn.recv_bytes().split(FRAME_SEPARATOR):
                    message = from_wire(data, CHANNEL_WIRE)
                    if pid is None:
                        if not isinstance(message, Hello):
                            return  # not a worker of ours: every worker says hello first
                        pid = message.pid
                        with self._lock:
                            self._conns[pid] = conn
                    self._on_message(pid, message)
        except (EOFError, OSError):
            pass
        finally:
            if pid is not None:
                with self._lock:
                    self._conns.pop(pid, None)
                self._on_gone(pid)
