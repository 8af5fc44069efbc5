"""Runs in worker processes: the code loky (or Dask) executes for each role.

A worker connects once, at start, to the parent's channel and keeps the
batch's cancel event; per task it only receives a few plain values (a chunk
of roles, when roles are short). It never opens the ledger and never imports
duckdb: everything it learns goes back to the parent as JSON on the channel,
in order: each role's start, its events, and its outcome.
"""

from __future__ import annotations

import json
import os
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
from parroles.errors import OutputError, RoleCancelled
from parroles.roles import as_role, to_json


class WorkerState:
    """Everything a worker keeps between tasks; set once by ``init_worker`` (or per batch, on Dask)."""

    def __init__(self, conn: Connection | None, cancel_event: Any, role_executor: Callable[..., Any]):
        self.conn = conn
        self.cancel_event = cancel_event
        self.role_executor = role_executor
        self.send_lock = threading.Lock()
        self.batch_stop: str | None = None  # why the whole batch is stopping, once it is
        self.run_stop: dict[int, str] = {}  # dispatch id -> why the parent told that role to stop

    def send(self, message: list[Any]) -> None:
        if self.conn is None:
            return
        data = json.dumps(message).encode()
        with self.send_lock:
            self.conn.send_bytes(data)


_state: WorkerState | None = None


def init_worker(
    generation: int,
    address: str | None,
    authkey: bytes | None,
    cancel_event: Any,
    executor_blob: bytes,
    sys_path: Sequence[str],
    parent_pid: int | None,
) -> None:
    """Executor initializer: runs once per worker process."""
    global _state
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if parent_pid is not None:
        lifeline.lead_own_group()
        lifeline.watch_parent(parent_pid)
    conn = Client(address, authkey=authkey) if address else None
    _state = WorkerState(conn, cancel_event, cloudpickle.loads(executor_blob))
    _state.send(["hello", os.getpid(), socket.gethostname(), generation])
    if conn is not None:
        threading.Thread(target=_listen_to_parent, args=(_state,), daemon=True).start()
    threading.Thread(target=_watch_cancel_event, args=(_state,), daemon=True).start()


def _listen_to_parent(state: WorkerState) -> None:
    assert state.conn is not None
    try:
        while True:
            kind, dispatch_id, why = json.loads(state.conn.recv_bytes())
            if kind == "cancel":
                state.run_stop[dispatch_id] = why
    except (EOFError, OSError):
        # The parent is gone (or closed the batch): nothing here may outlive it.
        lifeline.kill_own_group()


def _watch_cancel_event(state: WorkerState) -> None:
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


def run_roles(tasks: Sequence[tuple[Any, ...]]) -> int:
    """Run a chunk of roles one after another; each reports its start, events and end on the channel."""
    state = _state
    assert state is not None, "init_worker did not run in this process"
    for task in tasks:
        state.send(["end", task[0], run_role(*task)])
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
        payload_json = to_json(payload)
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
