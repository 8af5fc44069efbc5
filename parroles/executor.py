"""``execute_roles_parallel``: run roles in worker processes, record each in the ledger.

Who runs where, and who writes what::

    caller's thread (parent)            backend workers (loky processes,     parent threads
                                        kept idle between batches)
    ─────────────────────────           ────────────────────────────────     ──────────────
    validate, write QUEUED rows ─┐
    keep the queue of roles      │      worker.init_worker (once each):
    dispatch ≤ max_concurrent    │        join the channel
      (+ a lookahead) ──────────────▶   worker.run_roles (per chunk): the
                                 │        batch's executor and cancel event,
                                 │        unpacked once per batch
                                 │      worker.run_role (per role):
                                 │        "start"(pid), "event"s, "end" ──▶ channel readers ─┐
                                 │        (a worker that died) ──────────▶ loky callback ───┤
    inbox ◀──────────────────────┼─────────────────────────────────────────────────────────┘
    one loop: statuses, timeouts,│
    fail-fast, crashes, signals  │
    ledger writer.enqueue ───────┴────────────────────────────────────▶ ledger writer thread
                                                                         (journal, then group commit
                                                                          to DuckDB; the only ledger
                                                                          writer)

Workers never see the ledger; the loop is the only code that decides a run's
status, and ``ledger_writer`` the only code that writes it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import queue
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cloudpickle

from parroles import signals
from parroles.backend import Backend, ChannelLost, Event, Finished, Lost, Message, Started
from parroles.batch import Batch, BatchPhase, Interrupt
from parroles.config import ParallelRoleConfig
from parroles.errors import BatchInterrupted, ConfigError, LedgerPendingWarning, ParallelExecutionFailed
from parroles.ledger import Ledger
from parroles.records import Reason, RoleRunResult, RunStatus, RunUpdate
from parroles.roles import RoleName, plain_str, role_name, validate_digest

RoleExecutor = Callable[[RoleName, str], Any]


def execute_roles_parallel(
    ledger: Ledger | str | os.PathLike[str],
    parent_run_id: str,
    roles: Sequence[RoleName],
    spec_digest: str,
    config: ParallelRoleConfig | None = None,
    role_executor: RoleExecutor | None = None,
    *,
    name: str | None = None,
    sys_path: Sequence[str] = (),
    on_update: Callable[[RunUpdate], None] | None = None,
) -> list[RoleRunResult]:
    """Run ``role_executor(role, run_id)`` for each role, each in a worker process.

    Returns one result per role, in the order of ``roles``. Raises
    ``ParallelExecutionFailed`` (results attached) when no role completed and
    at least one failed. ``name`` labels the batch; ``sys_path`` entries are
    importable in the workers; ``on_update`` is called (in the calling thread)
    each time a run starts or ends. ``KeyboardInterrupt`` (SIGINT) and ``BatchInterrupted``
    (SIGTERM) propagate once every run of the batch is ended in the ledger.

    The ledger may be busy (another process holds its file): roles run on and
    their records wait in the ledger's journal. Once every role ended, the call
    waits at most ``config.ledger_wait`` seconds for the last commit, then
    returns anyway with a ``LedgerPendingWarning``: the records are durable in
    the journal and the next open of the ledger applies them.
    """
    config = config if config is not None else ParallelRoleConfig()
    if not isinstance(config, ParallelRoleConfig):
        raise ConfigError(f"config must be a ParallelRoleConfig, got {type(config).__name__}")
    if not isinstance(parent_run_id, str) or not parent_run_id.strip():
        raise ConfigError(f"parent_run_id must be a non-empty string, got {parent_run_id!r}")
    parent_run_id, name = plain_str(parent_run_id), plain_str(name) if isinstance(name, str) else name
    validate_digest(spec_digest)
    spec_digest = plain_str(spec_digest)
    if not callable(role_executor):
        raise ConfigError(f"role_executor must be callable, got {role_executor!r}")
    try:
        executor_blob = cloudpickle.dumps(role_executor)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is a usage error
        raise ConfigError(f"role_executor cannot be sent to worker processes: {exc}") from exc
    names = [role_name(role) for role in roles]
    inbox: queue.SimpleQueue[Message | Interrupt] = queue.SimpleQueue()
    path = ledger.path if isinstance(ledger, Ledger) else os.path.abspath(os.fspath(ledger))
    with signals.deferred() as deferral, contextlib.ExitStack() as stack:
        deferral.raise_pending()  # a signal before anything started: nothing is run or written
        if names:  # workers boot while the ledger is opened and the batch recorded
            backend = _start_backend(config, min(config.max_concurrent, len(names)), executor_blob, sys_path, inbox)
            # Idle workers are kept for the next batch only when this one ended cleanly.
            stack.push(lambda exc_type, _exc, _tb: backend.close(reuse=exc_type is None))
        with deferral.interruptible():  # Ctrl-C while the file is busy: stop waiting, nothing written
            led = stack.enter_context(_opened(ledger, config.ledger_wait))
        batch = Batch.create(led, parent_run_id, names, spec_digest, config, name, on_update)
        loop = _Loop(batch, backend if names else None, inbox, deferral)
        results = loop.run()
    if loop.journaled:
        warnings.warn(LedgerPendingWarning(path, loop.journaled), stacklevel=2)
    if results and not any(r.success for r in results) and any(r.status is RunStatus.FAILED for r in results):
        raise ParallelExecutionFailed("all parallel role runs failed", results)
    return results


@contextlib.contextmanager
def _opened(ledger: Ledger | str | os.PathLike[str], busy_timeout: float) -> Iterator[Ledger]:
    if isinstance(ledger, Ledger):
        yield ledger
        return
    opened = Ledger(ledger, busy_timeout=busy_timeout)
    try:
        yield opened
    except BaseException as exc:
        try:
            opened.close_writer(wait=0)
        except Exception as cleanup:  # noqa: BLE001 - the error on its way is the one that matters
            _note(exc, cleanup, "and closing the ledger failed too")
        raise
    # The batch already waited for its last commit; what is left is journaled.
    opened.close_writer(wait=0)


def _note(exc: BaseException, cleanup: Exception, what: str) -> None:
    """Keep a cleanup's error beside the one on its way, unless it only says the same again."""
    if str(cleanup) != str(exc):
        exc.add_note(f"{what}: {cleanup}")


# Backends by the name ``ParallelRoleConfig.backend`` gives, imported only when used.
BACKENDS = {"loky": ("parroles.loky_backend", "LokyBackend"), "dask": ("parroles.dask_backend", "DaskBackend")}


def _start_backend(config: ParallelRoleConfig, workers: int, executor_blob: bytes, sys_path: Sequence[str],
                   inbox: queue.SimpleQueue[Message | Interrupt]) -> Backend:
    module, name = BACKENDS[config.backend]
    backend_class = getattr(importlib.import_module(module), name)
    return backend_class.open(workers, executor_blob, list(sys_path), inbox.put, config)  # type: ignore[no-any-return]


class _Loop:
    """The parent's one loop over the batch's inbox; see the module docstring."""

    def __init__(self, batch: Batch, backend: Backend | None, inbox: queue.SimpleQueue[Message | Interrupt],
                 deferral: signals.Deferral) -> None:
        self.batch = batch
        self.backend = backend
        self.inbox = inbox
        self.deferral = deferral
        self.journaled = 0  # records the ledger file could not take in time (durable in the journal)

    def run(self) -> list[RoleRunResult]:
        batch = self.batch
        # SIGINT and SIGTERM become inbox messages: a handler that raised could leave a run half-handled.
        with self.deferral.listening(lambda signum: self.inbox.put(Interrupt.of(signum))):
            try:
                if batch.unfinished:
                    self._dispatch()
                while batch.unfinished:
                    self._handle(self._next_message())
                    self._dispatch()
            except BaseException as exc:
                batch.abandon(exc)  # leave no run QUEUED or RUNNING behind a failure of our own
                try:
                    batch.close(batch.config.ledger_wait)
                except Exception as cleanup:  # noqa: BLE001 - the loop's own error is the one to raise
                    _note(exc, cleanup, "and the ledger could not record the batch's end")
                raise
        # The backend is closed by the caller, after this.
        self.journaled = self._close_batch()
        if batch.interrupt is not None:
            if batch.interrupt.signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise BatchInterrupted(batch.interrupt.name, 128 + batch.interrupt.signum)
        return batch.results()

    def _close_batch(self) -> int:
        """Record the batch's end and wait for the last commit; a signal meanwhile stops the wait."""
        try:
            with self.deferral.interruptible():
                return self.batch.close(self.batch.config.ledger_wait)
        except (KeyboardInterrupt, BatchInterrupted):
            self.batch.writer.flush(0)  # what is not committed is in the journal now (or this raises)
            raise

    def _next_message(self) -> Message | Interrupt | None:
        timeout = self.batch.seconds_to_next_deadline()
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def _dispatch(self) -> None:
        assert self.backend is not None
        for chunk in self.batch.chunks_to_dispatch(self.backend.lookahead, self.backend.max_chunk):
            self.backend.submit(chunk)

    def _handle(self, message: Message | Interrupt | None) -> None:
        batch, backend = self.batch, self.backend
        assert backend is not None
        if isinstance(message, Started):
            batch.started(message)
        elif isinstance(message, Event):
            batch.event(message)
        elif isinstance(message, Finished):
            batch.finished(message)
        elif isinstance(message, Lost):
            batch.lost(message)
        elif isinstance(message, ChannelLost):
            batch.cancel(Reason.CHANNEL_LOST, detail=message.detail)
        elif isinstance(message, Interrupt):
            if batch.interrupt is not None:  # a second signal: stop waiting for roles
                batch.expire_grace()
            batch.interrupt = message
            batch.cancel(message.reason, detail=f"{message.name} received")
        if batch.phase is BatchPhase.CANCELLING and not batch.cancel_signalled:
            batch.cancel_signalled = True
            backend.cancel_all()
        for run in batch.due_for_cancel():
            backend.cancel(run.dispatch_id, f"timed out after {run.timeout:g} s")  # type: ignore[arg-type]
        for run in batch.due_for_kill():
            backend.kill(run.dispatch_id)  # type: ignore[arg-type]
