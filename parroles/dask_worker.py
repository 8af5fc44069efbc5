"""Runs in Dask worker processes: a role of a batch that runs on a Dask cluster.

The worker keeps one ``DaskWorkerState`` per batch. Starts, events and
outcomes go back to the client as Dask structured events (``log_event`` on a
topic the client subscribes to); the fail-fast signal and per-role stop
requests are ``distributed.Event``s, polled at most every ``POLL_SECONDS``
so that a role calling ``cancelled()`` in a tight loop costs no round trips.
Like ``worker``, it never opens the ledger and never imports duckdb.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import cloudpickle

from parroles.worker import WorkerState, run_role

POLL_SECONDS = 0.1
CANCELLING = "the batch is being cancelled"


def topic(token: str) -> str:
    return f"parroles-{token}"


def cancel_event_name(token: str) -> str:
    return f"parroles-{token}-cancel"


def run_event_name(token: str, dispatch_id: int) -> str:
    return f"parroles-{token}-stop-{dispatch_id}"


class _PolledEvent:
    """A distributed.Event whose is_set() is asked of the scheduler at most every POLL_SECONDS."""

    def __init__(self, name: str) -> None:
        from distributed import Event

        self.event = Event(name)
        self._checked = 0.0
        self._set = False

    def is_set(self) -> bool:
        now = time.monotonic()
        if not self._set and now - self._checked >= POLL_SECONDS:
            self._checked = now
            self._set = self.event.is_set()
        return self._set

    def set(self) -> None:
        self.event.set()


class _RunStops(dict):  # type: ignore[type-arg]
    """dispatch id -> why to stop, read from each role's own distributed.Event."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.events: dict[int, _PolledEvent] = {}

    def get(self, dispatch_id: int, default: Any = None) -> Any:  # type: ignore[override]
        event = self.events.setdefault(dispatch_id, _PolledEvent(run_event_name(self.token, dispatch_id)))
        return "the role's own timeout" if event.is_set() else default

    def pop(self, dispatch_id: int, default: Any = None) -> Any:  # type: ignore[override]
        self.events.pop(dispatch_id, None)
        return default


class DaskWorkerState(WorkerState):
    def __init__(self, token: str, executor_blob: bytes) -> None:
        from distributed import get_worker

        super().__init__(None, _PolledEvent(cancel_event_name(token)), cloudpickle.loads(executor_blob))
        self.run_stop = _RunStops(token)  # type: ignore[assignment]
        self.topic = topic(token)
        self.worker = get_worker()

    def send(self, message: list[Any]) -> None:
        if message[0] == "start":
            message = [*message, self.worker.address]
        self.worker.log_event(self.topic, message)

    @property  # type: ignore[override]
    def batch_stop(self) -> str | None:
        return CANCELLING if self.cancel_event.is_set() else None

    @batch_stop.setter
    def batch_stop(self, value: str | None) -> None:
        pass  # derived from the event


# Batch states by token, newest last. A Dask worker outlives many batches and
# cannot tell when one ends; it keeps the few used most recently and forgets
# older ones (a batch whose state was forgotten gets a new one: it is rebuilt
# from the token and the executor every task carries).
KEPT_STATES = 8
_states: collections.OrderedDict[str, DaskWorkerState] = collections.OrderedDict()
_lock = threading.Lock()


def run_dask_role(token: str, executor_blob: bytes, sys_path: Sequence[str], task: Sequence[Any]) -> dict[str, Any]:
    """The Dask task of one role: its outcome as a dict of plain values."""
    with _lock:
        state = _states.get(token)
        if state is not None:
            _states.move_to_end(token)
        else:
            for entry in reversed(sys_path):
                if entry not in sys.path:
                    sys.path.insert(0, entry)
            state = _states[token] = DaskWorkerState(token, executor_blob)
            while len(_states) > KEPT_STATES:
                _states.popitem(last=False)
    return run_role(*task, state=state)
