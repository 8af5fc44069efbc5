"""Running a batch: ``run`` (the idiom of ``subprocess.run``) and ``execute_roles_parallel`` (the positional call).

Who runs where, and who writes what::

    caller's thread (parent)            backend workers (loky: a process per   parent threads
                                        slot, kept idle between batches)
    ─────────────────────────           ─────────────────────────────────      ──────────────
    validate, write QUEUED rows ─┐
    keep the queue of roles      │      loky.worker.init_worker (once each):
    dispatch ≤ max_concurrent    │        join the channel
      (+ a lookahead) ──────────────▶   loky.worker.run_roles (per chunk):
                                 │        the batch's executor and cancel event,
                                 │        unpacked once per batch
                                 │      backends.worker.run_role (per role):
                                 │        Started, Event..., Finished ──────▶ channel readers ─┐
                                 │        (a worker that died) ────────────▶ loky callback ───┤
    inbox ◀──────────────────────┼──────────────────────────────────────────────────────────┘
    loop.Loop: statuses (Batch), │
    timeouts, fail-fast, crashes,│
    signals                      │
    ledger writer.enqueue ───────┴──────────────────────────────────────▶ ledger writer thread
                                                                          (journal, then group commit
                                                                           to DuckDB; the only ledger
                                                                           writer)

Workers never see the ledger; the loop is the only code that decides a run's
status, and ``ledger.writer`` the only code that writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import queue
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle

from parroles import backends, signals
from parroles.backends.base import Backend
from parroles.config import ParallelRoleConfig, default_ledger_path
from parroles.digests import content_digest, validate_digest
from parroles.errors import ConfigError, LedgerPendingWarning, ParallelExecutionFailed
from parroles.pipeline import Graph, Role, role_executor_for
from parroles.results import BatchResult, RoleRunResult, RunStatus, RunUpdate
from parroles.roles import RoleName, plain_str, role_name
from parroles.runner import provenance
from parroles.runner.begin import NO_ORIGIN, Origin, create_batch
from parroles.runner.loop import Loop, MessageQueue, note

if TYPE_CHECKING:  # imported where used: workers start spawning before the ledger's modules load
    from parroles.ledger import Ledger

RoleExecutor = Callable[[RoleName, str], Any]


def run(
    roles: Sequence[RoleName | Role],
    fn: RoleExecutor | None = None,
    *,
    ledger: Ledger | str | os.PathLike[str] | None = None,
    batch_id: str | None = None,
    name: str | None = None,
    spec_digest: str | None = None,
    config: ParallelRoleConfig | None = None,
    on_update: Callable[[RunUpdate], None] | None = None,
    on_output: Callable[[str, str, str], None] | None = None,
    **config_fields: Any,
) -> BatchResult:
    """Run ``fn(role, run_id)`` for each role, each in a worker process, and record every run.

    Like ``subprocess.run``: it returns once every role has ended, and never
    raises because roles failed (``BatchResult.ok`` says whether all
    completed). ``ledger`` defaults to ``$PARROLES_LEDGER`` or
    ``.parroles/ledger.duckdb``; ``batch_id`` to ``<name>-<12 hex>``;
    ``spec_digest`` to a digest of the role names and ``fn``'s identity.
    ``ParallelRoleConfig`` fields may be given as keywords
    (``max_concurrent=2, fail_fast=True``), alone or over ``config``.
    """
    try:
        config = dataclasses.replace(config or ParallelRoleConfig(), **config_fields)
    except TypeError as exc:  # a keyword that is no config field
        raise ConfigError(f"not a ParallelRoleConfig field: {exc}") from None
    fn_name = getattr(fn, "__name__", "")
    name = name if name is not None else fn_name if fn_name.isidentifier() else "batch"
    batch_id = batch_id if batch_id is not None else f"{name}-{uuid.uuid4().hex[:12]}"
    digest = spec_digest if spec_digest is not None else _identity_digest(roles, fn)
    try:
        results = execute_roles_parallel(ledger if ledger is not None else default_ledger_path(), batch_id, roles,
                                         digest, config, fn, name=name, on_update=on_update, on_output=on_output)
    except ParallelExecutionFailed as exc:
        results = exc.results
    return BatchResult(batch_id, results)


def _identity_digest(roles: Sequence[RoleName | Role], fn: Any) -> str:
    """What a batch of ``run`` is, when no spec says it: its role names and its callable's name."""
    identity = f"{getattr(fn, '__module__', '')}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    names = [str(role.name) if isinstance(role, Role) else role_name(role) for role in roles]
    return content_digest(json.dumps({"roles": names, "fn": identity}).encode())


def execute_roles_parallel(
    ledger: Ledger | str | os.PathLike[str],
    parent_run_id: str,
    roles: Sequence[RoleName | Role],
    spec_digest: str,
    config: ParallelRoleConfig | None = None,
    role_executor: RoleExecutor | None = None,
    *,
    name: str | None = None,
    sys_path: Sequence[str] = (),
    on_update: Callable[[RunUpdate], None] | None = None,
    on_output: Callable[[str, str, str], None] | None = None,
    origin: Origin = NO_ORIGIN,
) -> list[RoleRunResult]:
    """Run each role in a worker process: its own ``fn(**params)``, else ``role_executor(role, run_id)``.

    ``roles`` mixes names and ``Role``s; a role starts once every role it
    ``needs`` COMPLETED, and sees their outputs (``context().inputs``); one
    whose need failed or was cancelled is CANCELLED (reason ``upstream``).

    Returns one result per role, in the order of ``roles``. Raises
    ``ParallelExecutionFailed`` (results attached) when no role completed and
    at least one failed. ``name`` labels the batch; ``sys_path`` entries are
    importable in the workers; ``on_update`` is called (in the calling thread)
    each time a run starts or ends; ``origin`` is what the batch's row says it came from (a spec file, a
    batch it resumes). ``KeyboardInterrupt`` (SIGINT) and ``BatchInterrupted``
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
    graph = Graph.of(roles, strict_handoffs=config.strict_handoffs)  # a bad graph runs and writes nothing
    executor = role_executor_for(graph.roles, role_executor)
    try:
        executor_blob = cloudpickle.dumps(executor)
    except Exception as exc:
        raise ConfigError(f"role_executor cannot be sent to worker processes: {exc}") from exc
    names = [str(role.name) for role in graph.roles]
    inbox: MessageQueue = queue.SimpleQueue()
    path = os.path.abspath(os.fspath(ledger)) if isinstance(ledger, (str, os.PathLike)) else ledger.path
    with signals.deferred() as deferral, contextlib.ExitStack() as stack:
        deferral.raise_pending()  # a signal before anything started: nothing is run or written
        git_sha = provenance.git_sha_soon()
        workers = _Workers(config, config.workers_for(len(names)), executor_blob, sys_path, inbox)
        # Idle workers are kept for the next batch only when this one ended cleanly.
        stack.push(lambda exc_type, _exc, _tb: workers.close(ended_cleanly=exc_type is None))
        if names and config.reuse is False:  # workers boot while the ledger is opened and the batch recorded
            workers.get()  # (with reuse, only once a role is to run: a batch reused whole starts none)
        # The ledger's modules load before the wait turns interruptible: a KeyboardInterrupt raised inside an
        # import (a dataclass's exec) leaves CPython flagged to end the process by SIGINT, whatever the exit code.
        import parroles.ledger  # noqa: F401

        with deferral.interruptible():  # Ctrl-C while the file is busy: stop waiting, nothing written
            led = stack.enter_context(_opened(ledger, config.ledger_wait))
        batch = create_batch(led, parent_run_id, graph, spec_digest, config, name, git_sha, on_update, on_output,
                             role_executor, origin)
        loop = Loop(batch, workers.get, inbox, deferral, backends.backend_class(config.backend))
        results = loop.run()
    if loop.journaled:
        warnings.warn(LedgerPendingWarning(path, loop.journaled), stacklevel=2)
    if results and not any(r.success for r in results) and any(r.status is RunStatus.FAILED for r in results):
        raise ParallelExecutionFailed("all parallel role runs failed", results)
    return results


@contextlib.contextmanager
def _opened(ledger: Ledger | str | os.PathLike[str], busy_timeout: float) -> Iterator[Ledger]:
    from parroles.ledger import Ledger

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
            note(exc, cleanup, "and closing the ledger failed too")
        raise
    # The batch already waited for its last commit; what is left is journaled.
    opened.close_writer(wait=0)


class _Workers:
    """The batch's backend, opened at the first ``get`` (at once, or once a role is to run), closed at the end."""

    def __init__(self, config: ParallelRoleConfig, workers: int, executor_blob: bytes, sys_path: Sequence[str],
                 inbox: MessageQueue) -> None:
        self._open = functools.partial(backends.backend_class(config.backend).open, workers, executor_blob,
                                       list(sys_path), inbox.put, config.backend_options())
        self._backend: Backend | None = None

    def get(self) -> Backend:
        if self._backend is None:
            self._backend = self._open()
        return self._backend

    def close(self, ended_cleanly: bool) -> None:
        if self._backend is not None:
            self._backend.close(ended_cleanly=ended_cleanly)
