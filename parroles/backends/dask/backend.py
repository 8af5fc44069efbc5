"""The Dask backend: roles on a Dask distributed cluster; the client stays the only ledger writer.

With an address it connects to that scheduler; without, it starts a
``LocalCluster`` of ``max_concurrent`` single-threaded worker processes for
the batch and closes it after. Roles go one per Dask task, at most
``max_concurrent`` at a time (no lookahead: a remote cluster may have more
threads than the batch may use). Workers report starts, events and outcomes
as Dask structured events, in order on one stream (``dask.worker``); a task's
own result is nothing. The client holds every task of the batch until the
batch closes: a task it released would be forgotten by the scheduler with its
begun-mark (``dask.worker``), and a worker that dies just then may still be
handed it again and run the role a second time (seen once in 450 runs of the
suite). A task Dask runs again while held finds its mark and is reported, not
run. The one place Dask's failures become parroles' own is ``_on_done`` below.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from parroles.backends import BackendOptions, DaskOptions
from parroles.backends.dask.preload import PARENT_ENV
from parroles.backends.dask.worker import (
    cancel_event_name,
    end_worker_descendants,
    run_dask_role,
    stop_mark,
    task_key,
    topic,
)
from parroles.backends.protocol import (
    Event,
    Finished,
    Inbox,
    Logs,
    LossCause,
    Lost,
    Outcome,
    Started,
    Task,
    from_wire,
)
from parroles.errors import BackendError, BackendWarning

END_DESCENDANTS_TIMEOUT = 5.0  # longest a killed role's worker is given to end what its roles started
RESTART_WAIT = 30.0  # longest a batch's end waits for a killed role's worker to be restarted (then it warns)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _connect(client_class: Any, address: str, timeout: float) -> Any:
    """A client of the scheduler at ``address``; BackendError (one line, exit 5) if it cannot be reached."""
    try:
        return client_class(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:  # distributed raises these when nothing answers in time
        raise BackendError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s") from exc


class DaskBackend:
    """Runs tasks on a Dask cluster; see the module docstring."""

    name = "dask"
    lookahead = 0
    max_chunk = 1

    def __init__(self, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
                 options: DaskOptions) -> None:
        from distributed import Client, LocalCluster
        from distributed import Event as DaskEvent

        self._cluster = None
        if options.address is None:
            with warnings.catch_warnings():  # e.g. "port 8787 in use": no dashboard is asked for
                warnings.simplefilter("ignore")
                self._cluster = LocalCluster(n_workers=max_workers, threads_per_worker=1, processes=True,
                                             dashboard_address=None, preload=["parroles.backends.dask.preload"],
                                             env={PARENT_ENV: str(os.getpid())})
            self._client = Client(self._cluster)
        else:
            self._client = _connect(Client, options.address, options.connect_timeout)
        self._token = uuid.uuid4().hex
        self._blob = executor_blob
        self._sys_path = list(sys_path)
        self._inbox = inbox
        self._cancel = DaskEvent(cancel_event_name(self._token), client=self._client)
        self._lock = threading.Lock()  # the dicts below change on Dask's callback thread and the loop's
        self._futures: dict[int, Any] = {}  # every task of the batch, held until it closes (see above)
        self._worker_of: dict[int, str] = {}
        self._killed: set[int] = set()
        self._restarts: list[threading.Thread] = []  # workers being restarted to stop a role past its grace
        self._ended: set[int] = set()  # dispatches whose end the loop has (a second one is dropped)
        self._client.subscribe_topic(topic(self._token), self._on_log_event)

    def submit(self, chunk: Sequence[Task]) -> None:
        for task in chunk:
            future = self._client.submit(run_dask_role, self._token, self._blob, self._sys_path, task,
                                         key=task_key(self._token, task.dispatch_id), pure=False)
            with self._lock:
                self._futures[task.dispatch_id] = future
            future.add_done_callback(lambda f, d=task.dispatch_id: self._on_done(d, f))

    def stop_all(self) -> None:
        self._cancel.set()

    def stop(self, dispatch_id: int, why: str) -> None:
        # The why goes where the role's worker polls for it: its task's metadata, dropped with the task.
        self._client.set_metadata(stop_mark(self._token, dispatch_id), why)

    def kill(self, dispatch_id: int) -> None:
        with self._lock:
            address = self._worker_of.get(dispatch_id)
            future = self._futures.get(dispatch_id)
            if address is None or future is None:
                return
            self._killed.add(dispatch_id)
        future.cancel()  # so that the scheduler does not run it again elsewhere
        # A Dask task cannot be interrupted; its worker process is restarted (by its nanny).
        restart = threading.Thread(target=self._restart, args=(address,), daemon=True)
        with self._lock:
            self._restarts.append(restart)
        restart.start()
        self._end(Lost(dispatch_id, LossCause.KILLED, f"Dask worker {address} was restarted"))

    @classmethod
    def open(cls, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
             options: BackendOptions) -> DaskBackend:
        assert isinstance(options, DaskOptions)
        return cls(max_workers, executor_blob, sys_path, inbox, options)

    @classmethod
    def start_workers(cls, max_workers: int, options: BackendOptions) -> None:
        """Nothing to start ahead: a cluster's workers are its own, and a LocalCluster is the batch's."""

    def close(self, ended_cleanly: bool) -> None:
        """The cluster's workers outlive the batch anyway; a LocalCluster of parroles' own does not."""
        if self._client.status == "closed":
            return
        with self._lock:
            restarts = list(self._restarts)
        for restart in restarts:  # a killed role's worker is restarting: the client it needs stays open till then
            restart.join(RESTART_WAIT)
        try:
            self._client.unsubscribe_topic(topic(self._token))
            with self._lock:
                left = list(self._futures.values())
            self._client.cancel(left)
        finally:
            # Closing a cluster whose roles were cancelled logs what Dask thinks of it: not the user's concern.
            with _quiet("distributed"):
                self._client.close()
                if self._cluster is not None:
                    self._cluster.close()

    def _restart(self, address: str) -> None:
        # First what its roles started: while the worker lives, all of it is under it (a subreaper). A worker
        # whose event loop does not answer (a role holding the GIL) is restarted without waiting longer.
        ending = threading.Thread(target=self._end_descendants, args=(address,), daemon=True)
        ending.start()
        ending.join(END_DESCENDANTS_TIMEOUT)
        try:
            self._client.restart_workers([address], raise_for_error=False)
        except Exception as exc:  # noqa: BLE001 - reported, not raised in a helper thread
            # The role's run already ended (Lost, KILLED); the batch goes on. Its worker may run on: say so.
            warnings.warn(f"could not restart Dask worker {address} to stop a role past its grace ({exc}); "
                          "the role may still be running there", BackendWarning, stacklevel=1)

    def _end_descendants(self, address: str) -> None:
        with contextlib.suppress(Exception):  # the worker died meanwhile: its restart says what there is to say
            self._client.run(end_worker_descendants, workers=[address], on_error="ignore")

    def _on_log_event(self, event: tuple[float, str]) -> None:
        """Runs on the client's event loop, one message at a time, in the order the worker sent them."""
        _, text = event
        message = from_wire(text.encode())
        if isinstance(message, Started):
            with self._lock:
                self._worker_of[message.dispatch_id] = message.host
        if isinstance(message, (Finished, Lost)):
            self._end(message)
        elif isinstance(message, (Started, Event, Logs)):
            self._inbox(message)

    def _end(self, message: Finished | Lost) -> None:
        """Report a dispatch's end once: a worker that finds it begun reports it lost after its outcome came."""
        with self._lock:
            if message.dispatch_id in self._ended:
                return
            self._ended.add(message.dispatch_id)
            self._worker_of.pop(message.dispatch_id, None)
        self._inbox(message)

    def _on_done(self, dispatch_id: int, future: Any) -> None:
        """Runs on Dask's callback thread once a task is done: only a failed task has anything to say here."""
        from distributed import KilledWorker

        with self._lock:
            killed = dispatch_id in self._killed
        if future.cancelled() or killed:
            return  # cancelled by us: its end was reported already, or is not wanted
        exc = future.exception()
        if exc is None:
            return  # its end came on the topic, before this
        if isinstance(exc, KilledWorker):
            # The start report may have died with the worker; the scheduler knows where it ran last.
            last = getattr(exc.last_worker, "address", None) or self._worker_of.get(dispatch_id, "(unknown)")
            detail = (f"Dask worker {last} died while running it; "
                      f"Dask gave up after {exc.allowed_failures} retries")
            self._end(Lost(dispatch_id, LossCause.CRASH, detail))
        else:
            self._end(Finished(dispatch_id, Outcome.failed(exc)))
