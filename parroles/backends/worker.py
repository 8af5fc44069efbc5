"""Runs in worker processes: one role's call, the same on every backend.

``run_role`` starts a role's context, calls its executor, and describes what
happened as an ``Outcome``. What differs between backends (where reports go,
how stop requests arrive, what to end when a stopped role ends) is a
``WorkerBatch``, implemented by ``loky.worker`` and ``dask.worker``. Like
every worker-side module, it never opens the ledger and never imports duckdb.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from parroles import role_context as _ctx
from parroles.backends import threads
from parroles.backends.capture import keep_streams, put_streams_back, worker_capture
from parroles.backends.protocol import Event, Logs, Outcome, OutcomeStatus, Started, Task
from parroles.backends.usage import Meter
from parroles.digests import content_digest
from parroles.errors import CommandFailed, EventPayloadError, InvalidHandoffToken, OutputError, Retry, RoleCancelled
from parroles.results import ErrorInfo, Failure, Reason, should_retry, type_name
from parroles.roles import HandoffToken, as_role, output_from_json, output_kind, to_finite_json

# The event a run gets when its output or an event's payload held NaN or an infinity (stored as null).
NONFINITE = "nonfinite"


class WorkerBatch(Protocol):
    """What a worker knows of the batch it serves."""

    role_executor: Callable[..., Any]
    host: str  # what Started says of where the role runs

    def report(self, message: Started | Event | Logs) -> None:
        """Send a role's start, events and output lines to the parent, in order (thread-safe)."""

    def why_batch_stops(self, exact: bool = False) -> str | None:
        """Why the whole batch is stopping, or None. ``exact``: ask now, not a cached copy."""

    def why_role_stops(self, dispatch_id: int) -> str | None:
        """Why the parent told this role to stop, or None."""

    def role_ended(self, dispatch_id: int, told_to_stop: bool) -> None:
        """A role ended (before its end is reported): forget it; a stopped role's processes end with it."""

    def stop_all(self) -> None:
        """Fail-fast: signal every worker that the batch is stopping."""


def run_role(task: Task, batch: WorkerBatch) -> Outcome:
    """Run one role and describe what happened."""
    not_started = batch.why_batch_stops(exact=task.fail_fast)
    if not_started is not None:
        return Outcome(OutcomeStatus.NOT_STARTED, stop_reason=not_started)
    with threads.role_threads(task.threads) as cap:
        batch.report(Started(task.dispatch_id, os.getpid(), batch.host, time.time(), cap))
        return _run_started(task, batch)


def _run_started(task: Task, batch: WorkerBatch) -> Outcome:
    events = 0

    def emit(kind: str, payload: Any) -> None:
        nonlocal events
        try:
            payload_json, nonfinite = to_finite_json(payload, what=f"event {events + 1} ({kind!r}): its payload")
        except OutputError as exc:  # an event, not the output: its own error type
            raise EventPayloadError(str(exc)) from None
        events += 1
        batch.report(Event(task.dispatch_id, kind, payload_json, time.time()))
        if nonfinite:
            emit(NONFINITE, {"where": "event", "seq": events, "paths": nonfinite})

    def stop_reason() -> str | None:
        return batch.why_role_stops(task.dispatch_id) or batch.why_batch_stops()

    ctx = _ctx.RoleContext(as_role(task.role), task.run_id, task.parent_run_id, task.attempt, stop_reason, emit)
    def send_lines(lines: list[tuple[int, str, str, float]]) -> None:
        batch.report(Logs(task.dispatch_id, lines))

    capture = worker_capture() if task.capture_output else None
    keep_streams()
    token = _ctx._enter(ctx)
    meter, begin = Meter(), time.perf_counter()
    try:
        if capture is not None:
            capture.begin(send_lines, task.max_log_bytes)
        status, output_json, kind, error, reason = _receive(ctx, task) or _call(batch, ctx, task)
    finally:
        if capture is not None:
            capture.end()  # every line it wrote is sent before its end is
        put_streams_back()
        _ctx._leave(token)
        told = stop_reason()
        batch.role_ended(task.dispatch_id, told is not None)
    failed = retry_facts(ctx.failure) if ctx.failure is not None else {}
    if status is OutcomeStatus.FAILED and task.fail_fast and not _retried(task, reason, failed):
        # Before returning, so a role queued behind this one sees it and never starts.
        batch.stop_all()
    duration_ms = (time.perf_counter() - begin) * 1000
    return Outcome(status, output_json, kind, error, reason, told, time.time(), duration_ms, **failed,
                   cost=meter.cost())


def retry_facts(exc: BaseException) -> dict[str, Any]:
    """What a retry policy is decided on, of the exception a role raised (see ``runner.retries``)."""
    names = [name for cls in type(exc).__mro__
             for name in (type_name(cls), f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__)]
    after = exc.after if isinstance(exc, Retry) else None
    return {"error_types": tuple(dict.fromkeys(names)),
            "exit_code": exc.returncode if isinstance(exc, CommandFailed) else None,
            "retry_after": (-1.0 if after is None else after) if isinstance(exc, Retry) else None}


def _retried(task: Task, reason: Reason | None, failed: dict[str, Any]) -> bool:
    """Whether the parent will give this failed attempt another (then fail-fast waits for the parent)."""
    if task.retry is None:
        return False
    return should_retry(task.retry, task.attempt, Failure(reason or Reason.ERROR, failed.get("error_types", ()),
                                                          failed.get("exit_code"), failed.get("retry_after")))


# How a role's call ended: its status, output JSON and kind, error, and reason.
_Ending = tuple[OutcomeStatus, str | None, str | None, ErrorInfo | None, Reason | None]


def _receive(ctx: _ctx.RoleContext, task: Task) -> _Ending | None:
    """Give the role its inputs and verified handoff tokens; a token that does not verify fails it (handoff).

    What is verified is the digest of the exact JSON recorded for the need, so
    a faithful handoff always verifies, whatever decoding it does to its value.
    """
    for handoff in task.inputs:
        actual = content_digest(handoff.output_json.encode())
        if actual != handoff.output_digest:
            exc = InvalidHandoffToken(f"token {handoff.token_id}: output digest {actual} does not match "
                                      f"{handoff.output_digest}")
            return OutcomeStatus.FAILED, None, None, ErrorInfo.from_exception(exc), Reason.HANDOFF
        token = HandoffToken(handoff.token_id, as_role(handoff.from_role),
                             output_from_json(handoff.output_json, handoff.output_kind), handoff.output_digest)
        ctx.inputs[handoff.from_role] = token.output
        ctx.handoffs[handoff.from_role] = token
    ctx.failed_needs.update(task.failed_needs)
    return None


def _call(batch: WorkerBatch, ctx: _ctx.RoleContext, task: Task) -> _Ending:
    try:
        value = batch.role_executor(ctx.role, task.run_id)
        output_json, nonfinite = encode_output(value, task.max_output_bytes)
        if nonfinite:
            ctx.emit(NONFINITE, {"where": "output", "paths": nonfinite})
        return OutcomeStatus.COMPLETED, output_json, output_kind(value), None, None
    except RoleCancelled as exc:
        return OutcomeStatus.CANCELLED, None, None, ErrorInfo.from_exception(exc), None
    except OutputError as exc:
        return OutcomeStatus.FAILED, None, None, ErrorInfo.from_exception(exc), Reason.OUTPUT
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the role, not the worker
        ctx.failure = exc
        return OutcomeStatus.FAILED, None, None, ErrorInfo.from_exception(exc), None


def encode_output(value: Any, limit: int) -> tuple[str, list[str]]:
    """An output's JSON (NaN and infinities as null) and where those were; OutputError past ``limit``."""
    text, nonfinite = to_finite_json(value)
    size = len(text.encode())
    if size > limit:
        raise OutputError(f"output is {size} bytes, over the limit of {limit} bytes")
    return text, nonfinite
