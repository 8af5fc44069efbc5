"""Runs in loky worker processes: joining the parent's channel, and the chunks of roles loky hands over.

A loky worker joins the parent's channel once, at start, and may serve many
batches in turn (idle workers are kept for the next batch). Each batch's
payload (the cloudpickled role executor, extra ``sys.path`` entries and the
batch's cancel event) reaches every worker once, on the channel; a chunk of
roles carries only the batch's key. It never opens the ledger and never
imports duckdb: everything it learns goes back to the parent as typed
messages on the channel (``protocol.to_wire``), in order: each role's start,
its events, and its outcome.

A loky worker is a child subreaper (``containment``): what its roles start stays
under it, wherever it moves. It kills all of it when a role that was told to
stop ends, when the parent says a batch is over (``Sweep``), and when the
parent dies; it reaps what ended between roles.

A process forked from a worker (a role's ``os.fork``, multiprocessing's
``fork`` context) drops its copy of the channel at once
(``_drop_channel_in_child``), so that the end of the channel (EOF) tells the
parent that the worker itself is gone, however long such a child lives on.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any

import cloudpickle

from parroles.backends import containment, threads
from parroles.backends.loky import lifeline
from parroles.backends.loky.channel import BATCH_FRAME, FRAME_SEPARATOR
from parroles.backends.loky.messages import CHANNEL_WIRE, Cancel, ChannelMessage, Hello, Sweep
from parroles.backends.protocol import Event, Finished, Logs, Started, Task, from_wire, to_wire
from parroles.backends.worker import run_role

PAYLOAD_TIMEOUT = 60.0  # seconds a chunk waits for its batch's payload to arrive on the channel
KEY_LENGTH = 32  # a batch key: uuid4().hex
CANCELLING = "the batch is being cancelled"
CHANNEL_LOST = "the cancel channel was lost (Manager process died)"


class ParentLink:
    """This worker's end of the channel: its connection to the parent, shared by every batch it serves.

    A role's end may be held (``hold``) until the next message, the next role's start most often, so that
    both cross in one frame (``channel.FRAME_SEPARATOR``): one write here, one read and one wake-up in the
    parent, instead of two each. ``release`` sends what is held; a chunk's last end is never held.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._held = b""

    def send(self, message: ChannelMessage) -> None:
        data = to_wire(message)
        with self._lock:
            if self._held:
                data, self._held = self._held + FRAME_SEPARATOR + data, b""
            self.conn.send_bytes(data)

    def hold(self, message: ChannelMessage) -> None:
        data = to_wire(message)
        with self._lock:
            if self._held:
                self.conn.send_bytes(self._held)
            self._held = data

    def release(self) -> None:
        with self._lock:
            if self._held:
                held, self._held = self._held, b""
                self.conn.send_bytes(held)


class LokyBatch:
    """A batch as a loky worker serves it (a ``WorkerBatch``): its executor, and its stop signals.

    The batch's cancel event is a Manager Event; a waiter thread copies it into
    ``_batch_stop`` so that ``cancelled()`` in a tight loop costs no round trip.
    Per-role stop requests arrive on the channel (``Cancel``).
    """

    host = socket.gethostname()

    def __init__(self, key: str, channel: ParentLink | None, role_executor: Callable[..., Any], cancel_event: Any,
                 role_stops: dict[int, str]) -> None:
        self.key = key
        self.role_executor = role_executor
        self._channel = channel
        self._cancel_event = cancel_event
        self._role_stops = role_stops
        self._batch_stop: str | None = None
        threading.Thread(target=self._watch_cancel_event, daemon=True).start()

    def report(self, message: Started | Event | Logs) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def why_batch_stops(self, exact: bool = False) -> str | None:
        if not exact:
            return self._batch_stop
        try:
            return CANCELLING if self._cancel_event.is_set() else None
        except Exception:  # noqa: BLE001 - the Manager died: that is a reason to stop too
            return CHANNEL_LOST

    def why_role_stops(self, dispatch_id: int) -> str | None:
        return self._role_stops.get(dispatch_id)

    def role_ended(self, dispatch_id: int, told_to_stop: bool) -> None:
        if told_to_stop:  # its timeout, fail-fast, an interrupt: what it started ends with it
            containment.end_descendants()
        self._role_stops.pop(dispatch_id, None)

    def stop_all(self) -> None:
        try:
            self._cancel_event.set()
        except Exception:  # noqa: BLE001 - the Manager died; the parent hears of it on its own
            pass

    def _watch_cancel_event(self) -> None:
        """The parent sets the event when the batch is cancelled, and again when it ends,
        so this thread never outlives its batch for long."""
        try:
            self._cancel_event.wait()
            self._batch_stop = CANCELLING
        except Exception:  # noqa: BLE001 - the Manager process died: the cancel channel is lost
            self._batch_stop = CHANNEL_LOST


class _Payloads:
    """The newest batch payload the parent sent (batches reach a worker one at a time)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._key: str | None = None
        self._payload = b""

    def put(self, key: str, payload: bytes) -> None:
        with self._cond:
            self._key, self._payload = key, payload
            self._cond.notify_all()

    def get(self, key: str) -> bytes:
        with self._cond:
            # A chunk may overtake its payload: they travel on different pipes.
            if not self._cond.wait_for(lambda: self._key == key, PAYLOAD_TIMEOUT):
                raise RuntimeError(f"the payload of batch {key} did not arrive within {PAYLOAD_TIMEOUT:g} s")
            return self._payload


_channel: ParentLink | None = None
_role_stops: dict[int, str] = {}  # dispatch id -> why; dispatch ids are unique per parent process
_payloads = _Payloads()
_batch: LokyBatch | None = None
_channel_fd: int | None = None  # this process's copy of the channel's socket; None in a forked child


def init_worker(slot: int, address: str | None, authkey: bytes | None, parent_pid: int | None,
                workers: int = 1) -> None:
    """Executor initializer: runs once per worker process (one per slot, see ``slot``), one of ``workers``."""
    global _channel, _channel_fd
    threads.cap_this_worker(workers)  # before a role loads a numeric library (``backends.threads``)
    if parent_pid is not None:
        containment.become_subreaper()  # what a role starts stays under this worker, wherever it moves
        lifeline.lead_own_group()
        containment.watch_parent(parent_pid)
    lifeline.drop_group_signals()  # held since the worker started (``lifeline.hold_group_signals``)
    if multiprocessing.get_start_method(allow_none=True) == "loky":
        # loky made itself multiprocessing's default here; a role's own spawn child (which has no loky) would be
        # told to use it and die at start. A role's multiprocessing works as in any fresh interpreter instead.
        multiprocessing.set_start_method(None, force=True)
    if address:
        try:
            connection = Client(address, authkey=authkey)
        except (FileNotFoundError, ConnectionRefusedError):
            os._exit(0)  # the pool that started this worker was shut down while it booted: nobody to serve
        _channel = ParentLink(connection)
        _channel_fd = connection.fileno()
        os.register_at_fork(after_in_child=_drop_channel_in_child)
        _channel.send(Hello(os.getpid(), socket.gethostname(), slot))
        threading.Thread(target=_listen_to_parent, args=(_channel,), daemon=True).start()


def _drop_channel_in_child() -> None:
    """Runs in every process forked from this worker, in the child, right after the fork: close its copy of the channel.

    Otherwise a child that outlives the worker keeps the socket open, and the
    parent hears of the worker's death only when that child ends. The fd's
    number is pointed at /dev/null (``dup2``), not left free: the child's copy
    of the ``Connection`` object still names it, and what it would send (or
    close, at exit) must not reach a file the child opens later under that
    number, nor the parent. Only system calls: no lock is taken (another thread
    of the worker may have held one at the fork), nothing can block. The
    worker's own copy of the socket is untouched (file descriptors are per
    process; ``shutdown`` would have ended the socket for the worker too).
    """
    global _channel_fd
    fd, _channel_fd = _channel_fd, None  # a child of this child has no copy of its own to drop
    if fd is None:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        null = -1
    try:
        if null >= 0:
            os.dup2(null, fd, inheritable=False)
        else:
            os.close(fd)
    except OSError:
        pass
    finally:
        if null >= 0 and null != fd:
            os.close(null)


def ready() -> int:
    """A no-op call that makes loky start a slot's worker now, not at its first chunk."""
    return os.getpid()


def batch_payload(executor_blob: bytes, sys_path: Sequence[str], cancel_event: Any) -> bytes:
    """What each worker gets once per batch (made in the parent, unpacked here)."""
    return pickle.dumps((executor_blob, list(sys_path), cancel_event))


def _batch_for(key: str) -> LokyBatch:
    global _batch
    if _batch is None or _batch.key != key:
        executor_blob, sys_path, cancel_event = pickle.loads(_payloads.get(key))
        for entry in reversed(sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        _batch = LokyBatch(key, _channel, cloudpickle.loads(executor_blob), cancel_event, _role_stops)
    return _batch


def _listen_to_parent(channel: ParentLink) -> None:
    try:
        while True:
            data = channel.conn.recv_bytes()
            if data[:1] == BATCH_FRAME:
                _payloads.put(data[1:1 + KEY_LENGTH].decode(), data[1 + KEY_LENGTH:])
                continue
            message = from_wire(data, CHANNEL_WIRE)
            if isinstance(message, Cancel):
                _role_stops[message.dispatch_id] = message.why
            elif isinstance(message, Sweep):
                # The batch is over: no role runs here now, so every child may go and be reaped.
                # Done before the next message, so it never touches the next batch's processes.
                containment.end_descendants()
    except (EOFError, OSError):
        # The parent is gone (or closed the pool): nothing here may outlive it.
        containment.end_all()


def run_roles(batch_key: str, tasks: Sequence[Task]) -> int:
    """Run a chunk of roles of one batch one after another; each reports its start, events and end."""
    batch = _batch_for(batch_key)
    try:
        for index, task in enumerate(tasks):
            outcome = run_role(task, batch)
            containment.reap_zombies()  # orphans that ended while the role ran; no role runs now
            if _channel is not None:
                ended = Finished(task.dispatch_id, outcome)
                if index + 1 < len(tasks):
                    _channel.hold(ended)  # with the next role's start (or its end): microseconds later
                else:
                    _channel.send(ended)
    finally:
        if _channel is not None:
            _channel.release()
    return len(tasks)
