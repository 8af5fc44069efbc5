"""The parent's book of one batch: each run's phase, its deadlines, its ledger record.

``executor._Loop`` feeds it what the backend reports; it decides each run's
status and hands every transition to the ledger writer. Nothing here talks
to worker processes.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from parroles.backends.protocol import (
    Event,
    Finished,
    Handoff,
    Logs,
    LossCause,
    Lost,
    OutcomeStatus,
    Started,
    Task,
)
from parroles.config import ParallelRoleConfig
from parroles.errors import BatchAbandoned, RoleCancelled, RoleTimeout, UpstreamFailed, WorkerCrashed
from parroles.results import BatchState, ErrorInfo, FailedNeed, Reason, RoleRunResult, RunStatus, RunUpdate
from parroles.roles import canonical_json, content_digest, output_from_json
from parroles.runner.dependencies import Dependencies
from parroles.runner.tracked import Interrupt, RunPhase, TrackedRun

if TYPE_CHECKING:  # imported where used: a cold start spawns workers before the ledger's modules load
    from parroles.ledger.writer import LedgerWriter

CHUNK_SECONDS = 0.02  # work per chunk aimed at, from the mean duration measured so far
# Dispatch ids are unique in the process, not just the batch: workers serve many
# batches, and a late stop request must never reach a later batch's role.
_DISPATCH_IDS = itertools.count(1)


class BatchPhase(enum.Enum):
    RUNNING = "running"
    CANCELLING = "cancelling"  # nothing more is dispatched; the backend is to be told to stop its roles
    STOPPING = "stopping"  # the backend was told; running roles are being stopped

    @property
    def cancelled(self) -> bool:
        return self is not BatchPhase.RUNNING


class Batch:
    def __init__(self, writer: LedgerWriter, batch_id: str, config: ParallelRoleConfig, runs: list[TrackedRun],
                 on_update: Callable[[RunUpdate], None] | None = None,
                 on_output: Callable[[str, str, str], None] | None = None):
        self.writer = writer
        self.on_update = on_update
        self.on_output = on_output  # (role, stream, line) as each line arrives
        self.batch_id = batch_id
        self.config = config
        self.runs = runs
        self.phase = BatchPhase.RUNNING
        self.cancel_reason: Reason | None = None
        self.cancelled_by: str | None = None
        self.cancel_detail: str | None = None
        self.interrupt: Interrupt | None = None  # the first signal that reached the parent, if any
        self._dependencies = Dependencies([run.needs for run in runs])
        # Runs free to start, by position: a role starts in batch order once all it needs COMPLETED.
        self._queue = [(position, runs[position]) for position in self._dependencies.initially_ready()]
        self._waiting = {run.position: run for run in runs if run.needs}  # until what they need completes
        self._held: list[TrackedRun] = []  # not started because of a cancel this loop has not heard of yet
        self._held_ends: list[Finished] = []  # stopped by a cancel this loop has not heard of yet
        self._by_dispatch: dict[int, TrackedRun] = {}
        self._unfinished = len(runs)
        self._timed = any(run.timeout is not None for run in runs)
        self._mean_ms: float | None = None  # running mean duration of the roles that ended

    # -- dispatch -------------------------------------------------------------------------

    @property
    def unfinished(self) -> bool:
        return self._unfinished > 0

    def chunks_to_dispatch(self, lookahead: int, max_chunk: int) -> Iterator[list[Task]]:
        """Chunks of queued roles to hand to the backend, keeping every worker fed.

        Short roles travel in chunks (one pool round trip for many roles), sized
        from the roles measured so far so that a chunk is about CHUNK_SECONDS of
        work; roles of unknown or long duration travel one at a time.
        """
        workers = self.config.max_concurrent
        size = self._chunk_size(max_chunk)
        limit = workers + lookahead * size
        while self.phase is BatchPhase.RUNNING and self._queue and len(self._by_dispatch) < limit:
            fair_share = -(-len(self._queue) // (2 * workers))  # never starve a worker at the end
            yield [self._dispatch(heapq.heappop(self._queue)[1]) for _ in range(min(size, fair_share))]

    def _chunk_size(self, max_chunk: int) -> int:
        if self._mean_ms is None:
            return 1
        return max(1, min(max_chunk, int(CHUNK_SECONDS * 1000 / max(self._mean_ms, 1e-3))))

    def _dispatch(self, run: TrackedRun) -> Task:
        inputs = self._handoffs_to(run)
        run.dispatch_id, run.phase = next(_DISPATCH_IDS), RunPhase.DISPATCHED
        self._by_dispatch[run.dispatch_id] = run
        return Task(run.dispatch_id, run.name, run.run_id, self.batch_id, run.starts + 1,
                    self.config.fail_fast, self.config.max_output_bytes, inputs, self.config.capture_output,
                    self.config.max_log_bytes, tuple(run.failed_needs.items()))

    def _handoffs_to(self, run: TrackedRun) -> tuple[Handoff, ...]:
        """What ``run`` is handed: each needed run's output with the digest recorded for it.

        The worker verifies each against its digest before the role's function runs
        (``backends.worker``): that is where an output travelled, so that is where it is checked.
        """
        handoffs, now = [], time.time()
        for position in run.needs:
            upstream = self.runs[position]
            if upstream.output_json is None or upstream.output_digest is None:
                continue  # a need that did not complete (on_failed_needs="run"): in its failed_needs instead
            handoff = Handoff(upstream.name, str(uuid.uuid4()), upstream.output_json, upstream.output_digest,
                              upstream.output_kind)
            handoffs.append(handoff)
            # Recorded when it starts: a dispatched role may still never start (fail-fast, an interrupt).
            run.handed.append((handoff.token_id, upstream.run_id, run.run_id, handoff.output_digest, now))
        return tuple(handoffs)

    # -- what the backend reports ----------------------------------------------------------

    def started(self, message: Started) -> None:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return
        run.phase, run.started_wall = RunPhase.RUNNING, message.started_at
        run.starts += 1
        now = time.monotonic()
        if run.timeout is not None:
            run.cancel_due = now + run.timeout
        if self.phase.cancelled:
            run.stop_cause = run.stop_cause or self.cancel_reason
            run.told_at = run.told_at or now
            run.kill_due = now + self.config.cancel_grace
        self.writer.transition(run.run_id, RunStatus.RUNNING, started_at=message.started_at, ready_at=run.ready_at,
                               worker_pid=message.pid, worker_host=message.host, attempt=run.attempt)
        if run.handed:
            self.writer.add_handoffs(run.handed)
            run.handed = []
        self._notify(run, RunStatus.RUNNING)

    def event(self, message: Event) -> None:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is not None:
            self.writer.add_event(run.run_id, message.kind, message.payload_json, message.ts)

    def logs(self, message: Logs) -> None:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return
        self.writer.add_logs([(run.run_id, seq, stream, line, ts) for seq, stream, line, ts in message.lines])
        if self.on_output is not None:
            for _, stream, line, _ in message.lines:
                self.on_output(run.name, stream, line)

    def finished(self, message: Finished) -> None:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return
        outcome = message.outcome
        timing: dict[str, Any] = {"finished_at": outcome.finished_at, "duration_ms": outcome.duration_ms}
        if outcome.status is OutcomeStatus.NOT_STARTED and self.phase is BatchPhase.RUNNING:
            # Its worker saw the batch's cancel event before this loop did: the failure (or the lost
            # channel) that set it is still on its way here. Held until then, so its reason is the real one.
            del self._by_dispatch[message.dispatch_id]
            run.phase, run.dispatch_id = RunPhase.QUEUED, None
            self._held.append(run)
        elif outcome.status is OutcomeStatus.NOT_STARTED:
            self._cancel_run(run, error=None)
        elif outcome.status is OutcomeStatus.CANCELLED and outcome.stop_reason is not None \
                and run.stop_cause is None and self.phase is BatchPhase.RUNNING:
            # Likewise a role that stopped when told to by that cancel: held, so its reason is the real one.
            self._held_ends.append(message)
        elif outcome.status is OutcomeStatus.COMPLETED:
            self._end(run, RunStatus.COMPLETED, output_json=outcome.output_json, output_kind=outcome.output_kind,
                      **timing)
        elif outcome.status is OutcomeStatus.FAILED:
            self._end(run, RunStatus.FAILED, error=outcome.error, reason=outcome.reason or Reason.ERROR, **timing)
        elif run.stop_cause is Reason.TIMEOUT:
            traceback = outcome.error.traceback if outcome.error else ""
            self._end(run, RunStatus.FAILED, error=self._timeout_error(run, traceback), reason=Reason.TIMEOUT,
                      **timing)
        else:
            self._cancel_run(run, error=outcome.error, **timing)

    def lost(self, message: Lost) -> None:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return
        if message.cause is LossCause.CRASH:
            error = ErrorInfo.of(WorkerCrashed, message.detail)
            self._end(run, RunStatus.FAILED, error=error, reason=Reason.CRASH, **self._wall_timing(run))
        elif run.stop_cause is Reason.TIMEOUT:
            error = self._timeout_error(run, f"its worker was killed {self._since_told(run)}")
            self._end(run, RunStatus.FAILED, error=error, reason=Reason.TIMEOUT, **self._wall_timing(run))
        else:  # KILLED: its grace ran out after fail-fast or an interrupt
            detail = f"{message.detail} {self._since_told(run)}"
            self._cancel_run(run, error=ErrorInfo.of(RoleCancelled, detail), **self._wall_timing(run))

    def _since_told(self, run: TrackedRun) -> str:
        """How long after it was told to stop a run's worker was killed, and why then: what happened."""
        after = time.monotonic() - run.told_at if run.told_at is not None else 0.0
        why = "a second signal cut its grace short" if run.grace_cut else f"its grace is {self.config.cancel_grace:g} s"
        return f"{after:.1f} s after the role was told to stop ({why})"

    # -- stopping ----------------------------------------------------------------------

    def cancel(self, reason: Reason, cancelled_by: str | None = None, detail: str | None = None) -> None:
        """Stop the batch: queued runs end now, running ones after ``cancel_grace``."""
        if self.phase.cancelled:
            return
        self.phase, self.cancel_reason, self.cancelled_by, self.cancel_detail = (
            BatchPhase.CANCELLING, reason, cancelled_by, detail)
        queued, self._queue = [run for _, run in sorted(self._queue)], []
        waiting, self._waiting = sorted(self._waiting.values(), key=lambda run: run.position), {}
        held, self._held = self._held, []
        for run in sorted([*queued, *waiting, *held], key=lambda run: run.position):
            self._cancel_run(run, error=None)
        now = time.monotonic()
        kill_due = now + self.config.cancel_grace
        for run in self._by_dispatch.values():
            if run.phase is RunPhase.RUNNING:
                run.told_at = run.told_at or now
                run.stop_cause = run.stop_cause or reason
            # A dispatched run's worker says it did not start once it reads the cancel event; one that never
            # gets there (stuck while it starts) is stopped at the same deadline, or the batch never ends.
            run.kill_due = min(run.kill_due or kill_due, kill_due)
        held_ends, self._held_ends = self._held_ends, []
        for message in held_ends:
            self.finished(message)

    def interrupted(self, interrupt: Interrupt) -> None:
        """A signal reached the parent: cancel the batch; a second one ends every grace at once."""
        if self.interrupt is not None:
            self.expire_grace()
        else:
            self.interrupt = interrupt
        self.cancel(interrupt.reason, detail=f"{interrupt.name} received")

    def backend_to_stop(self) -> bool:
        """True once, when the batch has just been cancelled: the backend is to signal its workers."""
        if self.phase is BatchPhase.CANCELLING:
            self.phase = BatchPhase.STOPPING
            return True
        return False

    def expire_grace(self) -> None:
        now = time.monotonic()
        for run in self._by_dispatch.values():
            run.kill_due, run.grace_cut = now, True

    def due_for_cancel(self) -> list[TrackedRun]:
        """Running roles whose own timeout just expired (to be told to stop)."""
        if not self._timed:
            return []
        now, due = time.monotonic(), []
        for run in self._by_dispatch.values():
            if run.cancel_due is not None and run.cancel_due <= now:
                run.cancel_due = None
                if run.stop_cause is None:
                    run.stop_cause, run.told_at = Reason.TIMEOUT, now
                    run.kill_due = now + self.config.cancel_grace
                    due.append(run)
        return due

    def due_for_kill(self) -> list[TrackedRun]:
        if self.phase is BatchPhase.RUNNING and not self._timed:
            return []
        now, due = time.monotonic(), []
        for run in self._by_dispatch.values():
            if run.kill_due is not None and run.kill_due <= now:
                run.kill_due = None
                due.append(run)
        return due

    def seconds_to_next_deadline(self) -> float | None:
        if self.phase is BatchPhase.RUNNING and not self._timed:
            return None  # no timeout and nothing being stopped: nothing to wake up for
        dues = [d for run in self._by_dispatch.values() for d in (run.cancel_due, run.kill_due) if d is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    # -- ending runs ---------------------------------------------------------------------

    def _timeout_error(self, run: TrackedRun, traceback: str) -> ErrorInfo:
        return ErrorInfo.of(RoleTimeout, f"timed out after {run.timeout:g} s", traceback)

    def _wall_timing(self, run: TrackedRun) -> dict[str, Any]:
        now = time.time()
        duration = (now - run.started_wall) * 1000 if run.started_wall is not None else None
        return {"finished_at": now, "duration_ms": duration}

    def _cancel_run(self, run: TrackedRun, error: ErrorInfo | None, **timing: Any) -> None:
        # Neither told nor cancelled: the role raised RoleCancelled of its own accord.
        reason = run.stop_cause or self.cancel_reason or Reason.ERROR
        cancelled_by = self.cancelled_by if reason is Reason.FAIL_FAST else None
        if error is None and self.cancel_detail and reason is not Reason.FAIL_FAST:
            error = ErrorInfo.of(RoleCancelled, self.cancel_detail)
        self._end(run, RunStatus.CANCELLED, error=error, reason=reason, cancelled_by=cancelled_by, **timing)

    def _end(self, run: TrackedRun, status: RunStatus, *, output_json: str | None = None,
             output_kind: str | None = None,
             error: ErrorInfo | None = None, reason: Reason | None = None, cancelled_by: str | None = None,
             finished_at: float | None = None, duration_ms: float | None = None) -> None:
        if run.dispatch_id is not None:
            self._by_dispatch.pop(run.dispatch_id, None)
        run.phase, run.cancel_due, run.kill_due = RunPhase.DONE, None, None
        self._unfinished -= 1
        if duration_ms is not None:
            self._mean_ms = duration_ms if self._mean_ms is None else 0.9 * self._mean_ms + 0.1 * duration_ms
        run.result = RoleRunResult(
            role=run.role, run_id=run.run_id, status=status,
            output=output_from_json(output_json, output_kind) if output_json is not None else None,
            error=error, duration_ms=duration_ms, attempt=run.attempt, reason=reason, cancelled_by=cancelled_by)
        digest = content_digest(output_json.encode()) if output_json else None
        columns = {"finished_at": finished_at or time.time(), "duration_ms": duration_ms, "output": output_json,
                   "output_kind": output_kind, "output_digest": digest, "ready_at": run.ready_at,
                   "error": canonical_json(error.to_dict()) if error else None,
                   "reason": reason.value if reason else None, "cancelled_by": cancelled_by}
        # Only what this run has: fewer columns for the group commit to carry.
        self.writer.transition(run.run_id, status, **{k: v for k, v in columns.items() if v is not None})
        self._notify(run, status)
        if status is RunStatus.COMPLETED:
            run.output_json, run.output_digest, run.output_kind = output_json, digest, output_kind
        self._need_ended(run, status, reason)
        if status is RunStatus.FAILED and self.config.fail_fast:
            self.cancel(Reason.FAIL_FAST, cancelled_by=run.run_id)

    def _need_ended(self, run: TrackedRun, status: RunStatus, reason: Reason | None) -> None:
        """Tell the roles waiting for ``run`` that it ended: each is ready once all it needs ended as it
        requires (COMPLETED; or, with on_failed_needs="run", any way), else CANCELLED with reason upstream."""
        cause = run.upstream_cause or run  # a run cancelled upstream passes the name of the one that failed on
        for position in self._dependencies.dependents(run.position):
            dependent = self._waiting.get(position)
            if dependent is None:
                continue
            if status is RunStatus.COMPLETED or dependent.runs_after_failed_needs:
                if status is not RunStatus.COMPLETED:
                    dependent.failed_needs[run.name] = FailedNeed(status.value, reason.value if reason else None)
                if self._dependencies.met(run.position, position):
                    del self._waiting[position]
                    dependent.ready_at = time.time()
                    heapq.heappush(self._queue, (position, dependent))
                continue
            del self._waiting[position]
            dependent.upstream_cause = cause
            ended = cause.result.status.value if cause.result else "without completing"
            self._end(dependent, RunStatus.CANCELLED, error=ErrorInfo.of(UpstreamFailed, f"{cause.name}, which "
                      f"it needs, ended {ended}"), reason=Reason.UPSTREAM, cancelled_by=cause.run_id)


    def _notify(self, run: TrackedRun, status: RunStatus) -> None:
        if self.on_update is not None:
            self.on_update(RunUpdate(run.position, run.role, run.run_id, status, run.attempt, run.result))

    def abandon(self, exc: BaseException) -> None:
        """End every unfinished run after the loop itself failed with ``exc``."""
        error = ErrorInfo.of(BatchAbandoned, f"the batch stopped on an error of its own: {exc!r}")
        self.on_update = None  # the error may be the observer's own: it must not stop this loop too
        for run in self.runs:
            if run.phase is not RunPhase.DONE:
                status = RunStatus.FAILED if run.phase is RunPhase.RUNNING else RunStatus.CANCELLED
                self._end(run, status, error=error, reason=Reason.CRASH, **self._wall_timing(run))

    def close(self, ledger_wait: float) -> int:
        """Record how the batch ended; wait up to ``ledger_wait`` s until the ledger has it all.

        Returns how many records are left in the journal (see ``LedgerWriter.flush``).
        """
        state = BatchState.INTERRUPTED if self.interrupt is not None else BatchState.FINISHED
        self.writer.finish_batch(self.batch_id, state, time.time())
        return self.writer.flush(ledger_wait)

    def results(self) -> list[RoleRunResult]:
        return [run.result for run in self.runs if run.result is not None]
