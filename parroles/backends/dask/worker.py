"""Runs in Dask worker processes: a role of a batch that runs on a Dask cluster.

The worker keeps one ``DaskBatch`` per batch. Starts, events, output lines and
the outcome go back to the client as Dask structured events (``log_event`` on
a topic the client subscribes to), all on the worker's one ordered stream to
the scheduler, so they arrive in the order they were sent; the task itself
returns nothing the client needs. The fail-fast signal is a
``distributed.Event``; a single role's stop request is its why, set by the
client in the task's metadata (``stop_mark``). Both are asked of the scheduler
at most every ``POLL_SECONDS``, so that a role calling ``cancelled()`` in a
tight loop costs no round trips, and once seen they are kept.

A role runs at most once per dispatch: Dask runs a task again when the worker
that ran it (or holds its result) dies while the client holds the task (it
holds every task until the batch closes). Before it runs a role, the worker
marks its task as begun on the scheduler (task metadata under the task's key,
``[key, "begun"]``, beside the stop request's ``[key, "stop"]``; the scheduler
drops both when it forgets the task, after the batch); a worker that finds the
mark reports the dispatch ``Lost`` instead of running it again. Reading and
setting the mark are two round trips, not one atomic step: two workers running
one task at the same moment (Dask does that only when it gave up on a worker
that still runs) could both run it.

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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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


def begun_mark(token: str, dispatch_id: int) -> list[str]:
    """Where a dispatch's begun-mark is: its task's metadata, the worker that began it (a Dask address)."""
    return [task_key(token, dispatch_id), "begun"]


def stop_mark(token: str, dispatch_id: int) -> list[str]:
    """Where the client puts why a dispatch's role is to stop (``DaskBackend.stop``): its task's metadata."""
    return [task_key(token, dispatch_id), "stop"]


class _Polled:
    """An answer asked of the scheduler at most every POLL_SECONDS; the first one that is not None is kept."""

    def __init__(self, ask: Callable[[], str | None]) -> None:
        self._ask = ask
        self._checked = 0.0
        self._answer: str | None = None

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self._answer is None and now - self._checked >= POLL_SECONDS:
            self._checked = now
            self._answer = self._ask()
        return self._answer


class DaskBatch:
    """A batch as a Dask worker serves it (a ``WorkerBatch``).

    Reports go to the client as structured events on the batch's topic; the
    fail-fast signal is a ``distributed.Event``, each role's stop request its
    task's ``stop_mark``. What its roles start ends when no role runs in the
    worker (``_RUNNING``).
    """

    def __init__(self, token: str, executor_blob: bytes) -> None:
        from distributed import Event as DaskEvent
        from distributed import get_client, get_worker

        # Set here for a cluster that is not parroles' own (no preload); once is enough, again is harmless.
        containment.become_subreaper()
        self.token = token
        self.role_executor = cloudpickle.loads(executor_blob)
        self._worker = get_worker()
        self.host = self._worker.address
        # The worker's own client, taken in a Dask task: threads a role starts may ask cancelled(), and
        # get_client() there finds no task to go by.
        self.client: Any = get_client()
        self._cancel_event = DaskEvent(cancel_event_name(token), client=self.client)
        self._cancel = _Polled(lambda: CANCELLING if self._cancel_event.is_set() else None)
        self._role_stops: dict[int, _Polled] = {}  # the roles running here, while they run

    def report(self, message: Started | Event | Logs) -> None:
        self.send(message)

    def send(self, message: WireMessage) -> None:
        self._worker.log_event(topic(self.token), to_wire(message).decode())

    def why_batch_stops(self, exact: bool = False) -> str | None:
        return self._cancel()

    def role_begins(self, dispatch_id: int) -> None:
        """Listen for the role's stop request: the why the client sets in its task's metadata, if it does."""
        path = stop_mark(self.token, dispatch_id)
        self._role_stops[dispatch_id] = _Polled(lambda: self.client.get_metadata(path, None))

    def why_role_stops(self, dispatch_id: int) -> str | None:
        stop = self._role_stops.get(dispatch_id)
        return None if stop is None else stop()

    def role_ended(self, dispatch_id: int, told_to_stop: bool) -> None:
        self._role_stops.pop(dispatch_id, None)

    def stop_all(self) -> None:
        self._cancel_event.set()


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
    earlier = _mark_begun(state, task.dispatch_id)
    if earlier is not None:
        # Dask runs it again: the worker that began it died before the client released it. Its outcome,
        # if it has one, reached the client first (that worker's stream is ordered): the client ignores this.
        state.send(Lost(task.dispatch_id, LossCause.CRASH, f"Dask worker {earlier} died while running it"))
        return
    state.role_begins(task.dispatch_id)
    with _RUNNING.role():
        outcome = run_role(task, state)
    state.send(Finished(task.dispatch_id, outcome))


def end_worker_descendants() -> None:
    """Run by the client on a worker it is about to restart (a killed role): what its roles started ends now."""
    containment.end_descendants()


def _mark_begun(state: DaskBatch, dispatch_id: int) -> str | None:
    """Mark a task as begun here; the worker that began it before, if one did (see the module docstring).

    The mark itself is read, not the task's metadata: a stop request set there first is no mark."""
    path = begun_mark(state.token, dispatch_id)
    earlier: str | None = state.client.get_metadata(path, None)
    if earlier is None:
        state.client.set_metadata(path, state.host)
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
