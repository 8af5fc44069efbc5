"""Runs in Dask worker processes: a role of a batch that runs on a Dask cluster.

The worker keeps one ``DaskBatch`` per batch. Starts, events, output lines and
the outcome go back to the client as Dask structured events (``log_event`` on
a topic the client subscribes to), all on the worker's one ordered stream to
the scheduler, so they arrive in the order they were sent; the task itself
returns nothing the client needs. The fail-fast signal and per-role stop
requests are ``distributed.Event``s, polled at most every ``POLL_SECONDS``
so that a role calling ``cancelled()`` in a tight loop costs no round trips.

A role runs at most once per dispatch: Dask runs a task again when the worker
that ran it (or holds its result) dies while the client holds the task (it
holds every task until the batch closes). Before it runs a role, the worker
marks its task as begun on the scheduler (task metadata under the task's key,
which the scheduler drops when it forgets the task, after the batch); a worker
that finds the mark reports the dispatch ``Lost`` instead of running it
again. Reading and setting the mark are two round trips, not one atomic step:
two workers running one task at the same moment (Dask does that only when it
gave up on a worker that still runs) could both run it.

Containment: the worker process is a child subreaper (``containment``), and
when a role ends and no other role runs in the process, it kills every
process under it and reaps them. A worker with several threads (a remote
cluster's) that runs roles side by side ends their processes only when the
last of them ends, and it also ends processes that other (non-parroles) Dask
tasks of the same worker process started, and takes the exit status of any
that exited: give parroles workers of their own. Like every worker-side module,
it never opens the ledger and never imports duckdb.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import cloudpickle

from parroles.backends import containment
from parroles.backends.protocol import Event, Finished, Logs, LossCause, Lost, Started, Task, WireMessage, to_wire
from parroles.backends.worker import run_role

POLL_SECONDS = 0.1
CANCELLING = "the batch is being cancelled"


def topic(token: str) -> str:
    return f"parroles-{token}"


def task_key(token: str, dispatch_id: int) -> str:
    """The Dask key of a dispatch's task (and of its begun mark: the scheduler drops both together)."""
    return f"parroles-{token}-{dispatch_id}"


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


class DaskBatch:
    """A batch as a Dask worker serves it (a ``WorkerBatch``).

    Reports go to the client as structured events on the batch's topic; the
    fail-fast signal and each role's stop request are ``distributed.Event``s.
    What its roles start ends when no role runs in the worker (``_RUNNING``).
    """

    def __init__(self, token: str, executor_blob: bytes) -> None:
        from distributed import get_worker

        # Set here for a cluster that is not parroles' own (no preload); once is enough, again is harmless.
        containment.become_subreaper()
        self.token = token
        self.role_executor = cloudpickle.loads(executor_blob)
        self._worker = get_worker()
        self.host = self._worker.address
        self._cancel = _PolledEvent(cancel_event_name(token))
        self._role_events: dict[int, _PolledEvent] = {}

    def report(self, message: Started | Event | Logs) -> None:
        self.send(message)

    def send(self, message: WireMessage) -> None:
        self._worker.log_event(topic(self.token), to_wire(message).decode())

    def why_batch_stops(self, exact: bool = False) -> str | None:
        return CANCELLING if self._cancel.is_set() else None

    def why_role_stops(self, dispatch_id: int) -> str | None:
        event = self._role_events.get(dispatch_id)
        if event is None:
            event = self._role_events[dispatch_id] = _PolledEvent(run_event_name(self.token, dispatch_id))
        return "the role's own timeout" if event.is_set() else None

    def role_ended(self, dispatch_id: int, told_to_stop: bool) -> None:
        self._role_events.pop(dispatch_id, None)

    def stop_all(self) -> None:
        self._cancel.set()


# Batch states by token, newest last. A Dask worker outlives many batches and
# cannot tell when one ends; it keeps the few used most recently and forgets
# older ones (a batch whose state was forgotten gets a new one: it is rebuilt
# from the token and the executor every task carries).
KEPT_STATES = 8
_states: collections.OrderedDict[str, DaskBatch] = collections.OrderedDict()
_lock = threading.Lock()


class _Running:
    """How many roles run in this worker process; what they started ends when the last one ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @contextlib.contextmanager
    def role(self) -> Iterator[None]:
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0:
                    # Under the lock: a role that starts meanwhile waits, so its children are never taken for
                    # what an ended role left behind.
                    containment.end_descendants()


_RUNNING = _Running()


def run_dask_role(token: str, executor_blob: bytes, sys_path: Sequence[str], task: Task) -> None:
    """The Dask task of one role: it reports the role's start, events and end on the batch's topic."""
    state = _batch_state(token, executor_blob, sys_path)
    earlier = _mark_begun(task_key(token, task.dispatch_id), state.host)
    if earlier is not None:
        # Dask runs it again: the worker that began it died before the client released it. Its outcome,
        # if it has one, reached the client first (that worker's stream is ordered): the client ignores this.
        state.send(Lost(task.dispatch_id, LossCause.CRASH, f"Dask worker {earlier} died while running it"))
        return
    with _RUNNING.role():
        outcome = run_role(task, state)
    state.send(Finished(task.dispatch_id, outcome))


def end_worker_descendants() -> None:
    """Run by the client on a worker it is about to restart (a killed role): what its roles started ends now."""
    containment.end_descendants()


def _mark_begun(key: str, host: str) -> str | None:
    """Mark a task as begun here; the worker that began it before, if one did (see the module docstring)."""
    from distributed import get_client

    client = get_client()
    earlier: str | None = client.get_metadata(key, None)
    if earlier is None:
        client.set_metadata(key, host)
    return earlier


def _batch_state(token: str, executor_blob: bytes, sys_path: Sequence[str]) -> DaskBatch:
    with _lock:
        state = _states.get(token)
        if state is not None:
            _states.move_to_end(token)
        else:
            for entry in reversed(sys_path):
                if entry not in sys.path:
                    sys.path.insert(0, entry)
            state = _states[token] = DaskBatch(token, executor_blob)
            while len(_states) > KEPT_STATES:
                _states.popitem(last=False)
    return state


def kept_batches() -> int:
    """How many batches this worker keeps a state for (at most ``KEPT_STATES``)."""
    with _lock:
        return len(_states)
