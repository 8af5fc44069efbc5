"""Runs in worker processes: the code loky (or Dask) executes for each role.

A loky worker joins the parent's channel once, at start, and may serve many
batches in turn (idle workers are kept for the next batch). Each batch's
payload (the cloudpickled role executor, extra ``sys.path`` entries and the
batch's cancel event) reaches every worker once, on the channel; a chunk of
roles carries only the batch's key. It never opens the ledger and never
imports duckdb: everything it learns goes back to the parent as JSON on the
channel, in order: each role's start, its events, and its outcome.

A loky worker is a child subreaper (``lifeline``): what its roles start stays
under it, wherever it moves. It kills all of it when a role that was told to
stop ends, when the parent says a batch is over ("sweep"), and when the parent
dies; it reaps what ended between roles.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any

import cloudpickle

from parroles import lifeline
from parroles import role_context as _ctx
from parroles.channel import BATCH_FRAME
from parroles.errors import EventPayloadError, OutputError, RoleCancelled
from parroles.roles import as_role, to_json


class Channel:
    """This worker's connection to the parent, shared by every batch it serves."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: list[Any]) -> None:
        data = json.dumps(message).encode()
        with self._lock:
            self.conn.send_bytes(data)


class WorkerState:
    """What a worker knows of the batch it serves: its role executor and cancel signals."""

    def __init__(self, channel: Channel | None, cancel_event: Any, role_executor: Callable[..., Any],
                 run_stop: dict[int, str] | None = None, key: str = "",
                 after_stop: Callable[[], object] | None = None) -> None:
        self.channel = channel
        # Run when a role that was told to stop ends: a loky worker ends all it started (a
        # Dask worker may run other roles beside it, so it has none).
        self.after_stop = after_stop
        self.cancel_event = cancel_event
        self.role_executor = role_executor
        self.key = key
        self.batch_stop: str | None = None  # why the whole batch is stopping, once it is
        # dispatch id -> why the parent told that role to stop (dispatch ids are unique per parent process)
        self.run_stop: dict[int, str] = run_stop if run_stop is not None else {}

    def send(self, message: list[Any]) -> None:
        if self.channel is not None:
            self.channel.send(message)


PAYLOAD_TIMEOUT = 60.0  # seconds a chunk waits for its batch's payload to arrive on the channel
KEY_LENGTH = 32  # a batch key: uuid4().hex


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


_channel: Channel | None = None
_run_stop: dict[int, str] = {}
_payloads = _Payloads()
_state: WorkerState | None = None


def init_worker(slot: int, address: str | None, authkey: bytes | None, parent_pid: int | None) -> None:
    """Executor initializer: runs once per worker process (one per slot, see ``loky_slot``)."""
    global _channel
    if parent_pid is not None:
        lifeline.become_subreaper()  # what a role starts stays under this worker, wherever it moves
        lifeline.lead_own_group()
        lifeline.watch_parent(parent_pid)
    if address:
        _channel = Channel(Client(address, authkey=authkey))
        _channel.send(["hello", os.getpid(), socket.gethostname(), slot])
        threading.Thread(target=_listen_to_parent, args=(_channel,), daemon=True).start()


def ready() -> int:
    """A no-op call that makes loky start a slot's worker now, not at its first chunk."""
    return os.getpid()


def batch_payload(executor_blob: bytes, sys_path: Sequence[str], cancel_event: Any) -> bytes:
    """What each worker gets once per batch (made in the parent, unpacked here)."""
    return pickle.dumps((executor_blob, list(sys_path), cancel_event))


def _state_for(key: str) -> WorkerState:
    global _state
    if _state is None or _state.key != key:
        executor_blob, sys_path, cancel_event = pickle.loads(_payloads.get(key))
        for entry in reversed(sys_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        _state = WorkerState(_channel, cancel_event, cloudpickle.loads(executor_blob), _run_stop, key,
                             after_stop=lifeline.end_descendants)
        threading.Thread(target=_watch_cancel_event, args=(_state,), daemon=True).start()
    return _state


def _listen_to_parent(channel: Channel) -> None:
    try:
        while True:
            data = channel.conn.recv_bytes()
            if data[:1] == BATCH_FRAME:
                _payloads.put(data[1:1 + KEY_LENGTH].decode(), data[1 + KEY_LENGTH:])
                continue
            message = json.loads(data)
            if message[0] == "cancel":
                _run_stop[message[1]] = message[2]
            elif message[0] == "sweep":
                # The batch is over: no role runs here now, so every child may go and be reaped.
                # Done before the next message, so it never touches the next batch's processes.
                lifeline.end_descendants()
    except (EOFError, OSError):
        # The parent is gone (or closed the pool): nothing here may outlive it.
        lifeline.end_all()


def _watch_cancel_event(state: WorkerState) -> None:
    """Copy the batch's cancel event into ``batch_stop``, so polling ``cancelled()`` costs no round trip.

    The parent sets the event when the batch is cancelled, and again when it
    ends, so this thread never outlives its batch for long.
    """
    try:
        state.cancel_event.wait()
        state.batch_stop = "the batch is being cancelled"
    except Exception:  # the Manager process died: the cancel channel is lost
        state.batch_stop = "the cancel channel was lost (Manager process died)"


def _batch_cancelled(state: WorkerState) -> str | None:
    """Ask the Manager directly: exact, unlike the waiter thread's copy."""
    try:
        return "the batch is being cancelled" if state.cancel_event.is_set() else None
    except Exception:
        return "the cancel channel was lost (Manager process died)"


def run_roles(batch_key: str, tasks: Sequence[tuple[Any, ...]]) -> int:
    """Run a chunk of roles of one batch one after another; each reports its start, events and end."""
    state = _state_for(batch_key)
    for task in tasks:
        outcome = run_role(*task, state=state)
        lifeline.reap_zombies()  # orphans that ended while the role ran; no role runs now
        state.send(["end", task[0], outcome])
    return len(tasks)


def run_role(
    dispatch_id: int,
    role: str,
    run_id: str,
    parent_run_id: str,
    attempt: int,
    fail_fast: bool,
    max_output_bytes: int,
    state: WorkerState | None = None,
) -> dict[str, Any]:
    """Run one role and describe what happened as a dict of plain values."""
    state = state or _state
    assert state is not None, "init_worker did not run in this process"
    not_started = _batch_cancelled(state) if fail_fast else state.batch_stop
    if not_started is not None:
        return {"status": "not_started", "message": not_started}
    started_at = time.time()
    state.send(["start", dispatch_id, os.getpid(), started_at])
    events = 0

    def emit(kind: str, payload: Any) -> None:
        nonlocal events
        try:
            payload_json = to_json(payload)
        except OutputError as exc:  # an event, not the output: say which one
            raise EventPayloadError(f"event {events + 1} ({kind!r}): its payload is not JSON-serialisable: "
                                    f"{exc.__cause__ or exc}") from None
        events += 1
        state.send(["event", dispatch_id, kind, payload_json, time.time()])

    def stop_reason() -> str | None:
        return state.run_stop.get(dispatch_id) or state.batch_stop

    ctx = _ctx.RoleContext(as_role(role), run_id, parent_run_id, attempt, stop_reason, emit)
    token = _ctx._enter(ctx)
    begin = time.perf_counter()
    outcome: dict[str, Any] = {"pid": os.getpid(), "started_at": started_at}
    try:
        value = state.role_executor(ctx.role, run_id)
        outcome.update(status="completed", output=_encode_output(value, max_output_bytes))
    except RoleCancelled as exc:
        outcome.update(status="cancelled", error=_describe(exc), message=stop_reason())
    except OutputError as exc:
        outcome.update(status="failed", error=_describe(exc), reason="output")
    except BaseException as exc:  # noqa: B036 - SystemExit and KeyboardInterrupt fail the role, not the worker
        outcome.update(status="failed", error=_describe(exc))
    finally:
        _ctx._leave(token)
        if state.after_stop is not None and stop_reason() is not None:
            # Told to stop (its timeout, fail-fast, an interrupt): what it started ends with it,
            # before its end is reported.
            state.after_stop()
        state.run_stop.pop(dispatch_id, None)
    outcome.update(duration_ms=(time.perf_counter() - begin) * 1000, finished_at=time.time(), events=events)
    if outcome["status"] == "failed" and fail_fast:
        # Set the event before returning, so a role queued behind this one in
        # loky's lookahead sees it and never starts.
        try:
            state.cancel_event.set()
        except Exception:
            pass
    return outcome


def _encode_output(value: Any, limit: int) -> str:
    text = to_json(value)
    size = len(text.encode())
    if size > limit:
        raise OutputError(f"output is {size} bytes, over the limit of {limit} bytes")
    return text


def _describe(exc: BaseException) -> dict[str, str]:
    """Exception -> type, message, traceback text; never raises, never pickles the exception."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = f"<{name} whose str() failed>"
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:
        text = ""
    return {"type": name, "message": message, "traceback": text}
