"""The parent's book of one batch: each run's state, its deadlines, its ledger record.

``runner.loop.Loop`` feeds it what the backend reports and the time, on the
loop's clock; it moves each run along ``runner.lifecycle``'s one table,
decides each run's status, hands every transition to the ledger writer, and
returns what is to be done (``lifecycle.Command``s). It acts on nothing
itself: the loop alone talks to the backend.
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from parroles.backends.protocol import Event, Finished, Logs, LossCause, Lost, OutcomeStatus, Started, Task
from parroles.config import ParallelRoleConfig
from parroles.errors import BatchAbandoned, RoleCancelled, UpstreamFailed, WorkerCrashed
from parroles.results import BatchState, ErrorInfo, FailedNeed, Failure, Reason, RunStatus, RunUpdate
from parroles.runner.attempts import Provenance, attempt_after, attempt_rows
from parroles.runner.commands import Command, ForgetMemory, KillRun, StopAll, WatchMemory
from parroles.runner.deadlines import next_deadline, retries_due, stops_due
from parroles.runner.dependencies import Dependencies
from parroles.runner.ending import Ending, killed_cost, since_told, stop_error, timeout_error, wall_timing
from parroles.runner.handoffs import handoffs_to
from parroles.runner.lifecycle import Happening, RunState, Stop
from parroles.runner.memory import MemoryExceeded
from parroles.runner.ready import ReadyRuns
from parroles.runner.reuse import RunKeys
from parroles.runner.tracked import Interrupt, TrackedRun

if TYPE_CHECKING:  # imported where used: a cold start spawns workers before the ledger's modules load
    from parroles.ledger.writer import LedgerWriter
    from parroles.results import Cost, RoleRunResult

# Dispatch ids are unique in the process, not just the batch: workers serve many
# batches, and a late stop request must never reach a later batch's role.
_DISPATCH_IDS = itertools.count(1)


class BatchPhase(enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"  # cancelled: nothing more is dispatched; the backend was told to stop its roles

    @property
    def cancelled(self) -> bool:
        return self is not BatchPhase.RUNNING


class Batch:
    def __init__(self, writer: LedgerWriter, batch_id: str, config: ParallelRoleConfig, runs: list[TrackedRun],
                 on_update: Callable[[RunUpdate], None] | None = None,
                 on_output: Callable[[str, str, str], None] | None = None,
                 provenance: Provenance | None = None, rng: random.Random | None = None,
                 keys: RunKeys | None = None, expected_ms: Mapping[int, float] | None = None):
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
        self._ready = ReadyRuns(expected_ms)  # a role starts once all it needs ended as it requires
        for run in runs:
            run.state = RunState.WAITING if run.needs else RunState.READY
            if not run.needs:
                self._ready.push(run)
        self._by_dispatch: dict[int, TrackedRun] = {}  # DISPATCHED, RUNNING, STOPPING, and HELD with its end
        self._commands: list[Command] = []  # what the handler being run found to do
        self._unfinished = len(runs)
        self._timed = any(run.timeout is not None for run in runs)
        self._provenance = provenance or Provenance(batch_id, None, None)
        self._rng = rng or random.Random()  # the retries' jitter: given, a schedule is reproducible
        self._attempts = {run.position: [run.run_id] for run in runs}  # every attempt's run id, by role
        self._backing_off: list[TrackedRun] = []  # attempts waiting out their delay
        self._keys = keys  # each run's cache key, and what it may reuse (None: no keys, as in unit tests)

    # -- dispatch -------------------------------------------------------------------------

    @property
    def unfinished(self) -> bool:
        return self._unfinished > 0

    def chunks_to_dispatch(self, lookahead: int, max_chunk: int, now: float) -> Iterator[list[Task]]:
        """Chunks of READY roles to hand to the backend, keeping every worker fed (a reused role is not handed);
        their order and size are ``runner.ready``'s."""
        workers = self.config.max_concurrent
        size = self._ready.chunk_size(max_chunk)
        limit = workers + lookahead * size
        while self.phase is BatchPhase.RUNNING and self._ready and len(self._by_dispatch) < limit:
            take = min(size, -(-len(self._ready) // (2 * workers)))  # a fair share: never starve a worker at the end
            chunk: list[Task] = []
            while self._ready and len(chunk) < take:
                run = self._ready.pop()
                if not self._reused(run, now):
                    chunk.append(self._dispatch(run))
            if chunk:
                yield chunk

    def _reused(self, run: TrackedRun, now: float) -> bool:
        """Give a first attempt its key (a retry keeps it); end it as reused if the key found a completed run."""
        if self._keys is None:
            return False
        if run.key is None:
            run.key = self._keys.key(run, self.runs)
        hit = self._keys.hit(run.key) if run.number == 1 else None
        if hit is None:
            return False
        run.reused_from = hit.run_id
        self._end(run, RunStatus.COMPLETED, now, output_json=hit.output_json, output_kind=hit.output_kind,
                  reason=Reason.REUSED, finished_at=time.time(), duration_ms=0.0)
        return True

    def _dispatch(self, run: TrackedRun) -> Task:
        run.move(Happening.DISPATCHED)
        inputs = handoffs_to(run, self.runs)
        run.dispatch_id = next(_DISPATCH_IDS)
        self._by_dispatch[run.dispatch_id] = run
        # With attempts left, its worker signals fail-fast itself only for a failure its policy does not retry.
        retry = run.policy if run.number <= run.policy.retries else None
        return Task(run.dispatch_id, run.name, run.run_id, self.batch_id, run.number,
                    self.config.fail_fast, self.config.max_output_bytes, inputs, self.config.capture_output,
                    self.config.max_log_bytes, tuple(run.failed_needs.items()), retry, run.threads)

    # -- what the backend reports: each handler returns what is to be done -------------------

    def started(self, message: Started, now: float) -> list[Command]:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return []
        run.move(Happening.STARTED)
        run.started_wall = message.started_at
        if run.timeout is not None:
            run.timeout_at = now + run.timeout
        if run.stop is not None:  # told before it started (the batch was cancelled): its grace starts now
            run.stop = Stop(run.stop.reason, now, now + self.config.cancel_grace)
        columns: dict[str, Any] = run.key_columns()
        if run.ready_later:
            columns["ready_at"] = run.ready_at
        self.writer.transition(run.run_id, RunStatus.RUNNING, started_at=message.started_at, worker_pid=message.pid,
                               worker_host=message.host, attempt=run.number, threads=message.threads, **columns)
        if run.handed:
            self.writer.add_handoffs(run.handed)
            run.handed = []
        self._notify(run, RunStatus.RUNNING)
        if run.memory_limit is not None:
            self._commands.append(WatchMemory(message.dispatch_id, message.pid, run.memory_limit))
        return self._take_commands()

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

    def finished(self, message: Finished, now: float) -> list[Command]:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is not None:
            self._finish(run, message, now)
        return self._take_commands()

    def _finish(self, run: TrackedRun, message: Finished, now: float) -> None:
        outcome = message.outcome
        timing: dict[str, Any] = {"finished_at": outcome.finished_at, "duration_ms": outcome.duration_ms,
                                  "cost": outcome.cost}
        saw_cancel = outcome.status is OutcomeStatus.NOT_STARTED or (
            outcome.status is OutcomeStatus.CANCELLED and outcome.stop_reason is not None and run.stop is None)
        if saw_cancel and self.phase is BatchPhase.RUNNING:
            # Its worker saw the batch's cancel event before this loop did: the failure (or the lost
            # channel) that set it is still on its way here. Held until then, so its reason is the real one.
            run.move(Happening.SAW_CANCEL)
            if outcome.status is OutcomeStatus.NOT_STARTED:
                del self._by_dispatch[message.dispatch_id]
                run.dispatch_id = None
            else:
                run.held_end = message
        elif outcome.status is OutcomeStatus.NOT_STARTED:
            self._cancel_run(run, now, error=None)
        elif outcome.status is OutcomeStatus.COMPLETED:
            self._end(run, RunStatus.COMPLETED, now, output_json=outcome.output_json,
                      output_kind=outcome.output_kind, **timing)
        elif outcome.status is OutcomeStatus.FAILED:
            reason = outcome.reason or Reason.ERROR
            failure = Failure(reason, outcome.error_types, outcome.exit_code, outcome.retry_after)
            self._end(run, RunStatus.FAILED, now, error=outcome.error, reason=reason, failure=failure, **timing)
        elif run.stop is not None and run.stop.reason is Reason.TIMEOUT:
            traceback = outcome.error.traceback if outcome.error else ""
            self._end(run, RunStatus.FAILED, now, error=timeout_error(run, traceback), reason=Reason.TIMEOUT,
                      **timing)
        else:
            self._cancel_run(run, now, error=outcome.error, **timing)

    def lost(self, message: Lost, now: float) -> list[Command]:
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None:
            return []
        if message.cause is LossCause.CRASH:
            error = ErrorInfo.of(WorkerCrashed, message.detail)
            self._end(run, RunStatus.FAILED, now, error=error, reason=Reason.CRASH, **wall_timing(run))
        elif run.stop is not None and run.stop.reason in (Reason.TIMEOUT, Reason.MEMORY):
            error = stop_error(run, now, self.config.cancel_grace)
            self._end(run, RunStatus.FAILED, now, error=error, reason=run.stop.reason, cost=killed_cost(run),
                      **wall_timing(run))
        else:  # KILLED: its grace ran out after fail-fast or an interrupt
            detail = f"{message.detail} {since_told(run, now, self.config.cancel_grace)}"
            self._cancel_run(run, now, error=ErrorInfo.of(RoleCancelled, detail), **wall_timing(run))
        return self._take_commands()

    # -- stopping ----------------------------------------------------------------------

    def cancel(self, reason: Reason, now: float, cancelled_by: str | None = None,
               detail: str | None = None) -> list[Command]:
        """Stop the batch: runs not dispatched end now, dispatched ones when they end or after ``cancel_grace``."""
        self._cancel(reason, now, cancelled_by, detail)
        return self._take_commands()

    def _cancel(self, reason: Reason, now: float, cancelled_by: str | None = None, detail: str | None = None) -> None:
        if self.phase.cancelled:
            return
        self.phase, self.cancel_reason, self.cancelled_by, self.cancel_detail = (
            BatchPhase.STOPPING, reason, cancelled_by, detail)
        self._commands.append(StopAll())
        self._ready.clear()
        self._backing_off = []
        for run in self.runs:  # in batch order
            if run.state in (RunState.WAITING, RunState.READY, RunState.BACKING_OFF) or (
                    run.state is RunState.HELD and not run.held_end):
                self._cancel_run(run, now, error=None)
        kill_at = now + self.config.cancel_grace
        held = []
        for run in list(self._by_dispatch.values()):
            # A dispatched run's worker says it did not start once it reads the cancel event; one that never
            # gets there (stuck while it starts) is killed at the same deadline, or the batch never ends.
            if run.state is RunState.HELD:
                held.append(run)
                run.stop = Stop(reason, now, kill_at)
                continue
            earlier = run.stop.kill_at if run.stop is not None and run.stop.kill_at is not None else kill_at
            run.stop = Stop(run.stop.reason if run.stop else reason, run.stop.told_at if run.stop else now,
                            min(earlier, kill_at), run.stop.grace_cut if run.stop else False)
            run.move(Happening.TOLD_TO_STOP)
        for run in held:  # their ends, held until now: their reason is this cancel's
            assert run.held_end is not None
            self._finish(run, run.held_end, now)

    def interrupted(self, interrupt: Interrupt, now: float) -> list[Command]:
        """A signal reached the parent: cancel the batch; a second one ends every grace at once."""
        if self.interrupt is not None:
            for run in self._by_dispatch.values():
                if run.stop is not None:
                    run.stop = run.stop.cut(now)
        else:
            self.interrupt = interrupt
        self._cancel(interrupt.reason, now, detail=f"{interrupt.name} received")
        return self._take_commands()

    def due(self, now: float) -> list[Command]:
        """What the clock says is to be done (``runner.deadlines``): retries, timeouts, kills."""
        if self.phase is BatchPhase.RUNNING and not self._timed and not self._backing_off:
            return []  # no timeout, no retry waiting and nothing being stopped: nothing can be due
        for run in retries_due(self._backing_off, now):
            self._ready.push(run)
        self._commands += stops_due(self._by_dispatch.values(), now, self.config.cancel_grace)
        return self._take_commands()

    def memory_exceeded(self, message: MemoryExceeded, now: float) -> list[Command]:
        """A running role's processes outgrew its memory_limit: its worker is killed now (no grace)."""
        run = self._by_dispatch.get(message.dispatch_id)
        if run is None or (run.stop is not None and run.stop.reason is Reason.MEMORY):
            return []
        run.peak_rss, run.stop = message.rss, Stop(Reason.MEMORY, now, None)
        run.move(Happening.TOLD_TO_STOP)
        return [KillRun(message.dispatch_id)]

    def seconds_to_next_deadline(self, now: float) -> float | None:
        if self.phase is BatchPhase.RUNNING and not self._timed and not self._backing_off:
            return None  # no timeout, no retry waiting and nothing being stopped: nothing to wake up for
        due = next_deadline(self._by_dispatch.values(), self._backing_off)
        return None if due is None else max(0.0, due - now)

    def _take_commands(self) -> list[Command]:
        commands, self._commands = self._commands, []
        return commands

    # -- ending runs ---------------------------------------------------------------------

    def _cancel_run(self, run: TrackedRun, now: float, error: ErrorInfo | None, **timing: Any) -> None:
        # Neither told nor cancelled: the role raised RoleCancelled of its own accord.
        reason = (run.stop.reason if run.stop else None) or self.cancel_reason or Reason.ERROR
        cancelled_by = self.cancelled_by if reason is Reason.FAIL_FAST else None
        if error is None and self.cancel_detail:  # never started: the cancel says why, whatever its cause
            error = ErrorInfo.of(RoleCancelled, self.cancel_detail)
        self._end(run, RunStatus.CANCELLED, now, error=error, reason=reason, cancelled_by=cancelled_by, **timing)

    def _end(self, run: TrackedRun, status: RunStatus, now: float, *, output_json: str | None = None,
             output_kind: str | None = None, error: ErrorInfo | None = None, reason: Reason | None = None,
             cancelled_by: str | None = None, finished_at: float | None = None,
             duration_ms: float | None = None, failure: Failure | None = None, cost: Cost | None = None) -> None:
        run.move(Happening.REUSED if reason is Reason.REUSED else Happening.ENDED)
        if run.dispatch_id is not None:
            self._by_dispatch.pop(run.dispatch_id, None)
            if run.memory_limit is not None and run.started_wall is not None:
                self._commands.append(ForgetMemory(run.dispatch_id))
        run.timeout_at, run.held_end = None, None
        self._unfinished -= 1
        if duration_ms is not None and reason is not Reason.REUSED:
            self._ready.ended(duration_ms)
        ended = Ending(status, output_json, output_kind, error, reason, cancelled_by, finished_at, duration_ms, cost)
        run.result = ended.result(run, tuple(self._attempts[run.position]))
        digest = ended.digest()
        self.writer.transition(run.run_id, status, **ended.columns(run, digest))
        self._notify(run, status)
        if status is RunStatus.FAILED and self._retried(run, failure or Failure(reason), now):
            return  # not the role's end: what needs it, and fail-fast, wait for its last attempt
        if status is RunStatus.COMPLETED:
            run.output_json, run.output_digest, run.output_kind = output_json, digest, output_kind
        self._need_ended(run, status, reason, now)
        if status is RunStatus.FAILED and self.config.fail_fast:
            self._cancel(Reason.FAIL_FAST, now, cancelled_by=run.run_id, detail=f"fail-fast: {run.name} failed")

    def _retried(self, run: TrackedRun, failure: Failure, now: float) -> bool:
        """Give the role of ``run`` another attempt if its policy says so (a new run, BACKING_OFF)."""
        attempt = None if self.phase.cancelled else attempt_after(run, failure, now, self._rng,
                                                                    self.config.memory_limit_growth)
        if attempt is None:
            return False
        self.runs[run.position] = attempt
        self._attempts[run.position].append(attempt.run_id)
        self._backing_off.append(attempt)
        self._unfinished += 1
        self.writer.start_runs(attempt_rows(attempt, self._provenance))
        self._notify(attempt, RunStatus.QUEUED)
        return True

    def _need_ended(self, run: TrackedRun, status: RunStatus, reason: Reason | None, now: float) -> None:
        """Tell the roles waiting for ``run`` that it ended: each is READY once all it needs ended as it
        requires (COMPLETED; or, with on_failed_needs="run", any way), else CANCELLED with reason upstream."""
        if self.phase.cancelled:
            return  # the batch's cancel ended every run still waiting, with its own reason
        cause = run.upstream_cause or run  # a run cancelled upstream passes the name of the one that failed on
        for position in self._dependencies.dependents(run.position):
            dependent = self.runs[position]
            if dependent.state is not RunState.WAITING:
                continue
            if status is RunStatus.COMPLETED or dependent.runs_after_failed_needs:
                if status is not RunStatus.COMPLETED:
                    dependent.failed_needs[run.name] = FailedNeed(status.value, reason.value if reason else None)
                if self._dependencies.met(run.position, position):
                    dependent.move(Happening.NEEDS_MET)
                    dependent.ready_at = time.time()
                    self._ready.push(dependent)
                continue
            dependent.upstream_cause = cause
            ended = cause.result.status.value if cause.result else "without completing"
            self._end(dependent, RunStatus.CANCELLED, now, error=ErrorInfo.of(UpstreamFailed, f"{cause.name}, "
                      f"which it needs, ended {ended}"), reason=Reason.UPSTREAM, cancelled_by=cause.run_id)

    def _notify(self, run: TrackedRun, status: RunStatus) -> None:
        if self.on_update is not None:
            self.on_update(RunUpdate(run.position, run.role, run.run_id, status, run.attempt, run.result))

    def abandon(self, exc: BaseException) -> None:
        """End every unfinished run after the loop itself failed with ``exc``."""
        error = ErrorInfo.of(BatchAbandoned, f"the batch stopped on an error of its own: {exc!r}")
        self.on_update = None  # the error may be the observer's own: it must not stop this loop too
        now = time.monotonic()  # no clock to be given here: the loop that had one failed
        for run in self.runs:
            if run.state is not RunState.ENDED:
                started = run.state in (RunState.RUNNING, RunState.STOPPING) and run.started_wall is not None
                status = RunStatus.FAILED if started else RunStatus.CANCELLED
                self._end(run, status, now, error=error, reason=Reason.CRASH, **wall_timing(run))
        self._commands = []

    def close(self, ledger_wait: float) -> int:
        """Record how the batch ended; wait up to ``ledger_wait`` s until the ledger has it all.

        Returns how many records are left in the journal (see ``LedgerWriter.flush``).
        """
        state = BatchState.INTERRUPTED if self.interrupt is not None else BatchState.FINISHED
        self.writer.finish_batch(self.batch_id, state, time.time())
        return self.writer.flush(ledger_wait)

    def results(self) -> list[RoleRunResult]:
        return [run.result for run in self.runs if run.result is not None]
