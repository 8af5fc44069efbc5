"""The parent's book of a batch, driven by hand-made messages: no processes, no ledger file."""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

from parroles.backends.protocol import Finished, LossCause, Lost, Outcome, OutcomeStatus, Started
from parroles.config import ParallelRoleConfig
from parroles.pipeline import Role
from parroles.results import ErrorInfo, Reason, RunStatus
from parroles.runner.batch import Batch, BatchPhase, TrackedRun
from parroles.runner.begin import retry_policy
from parroles.runner.tracked import Interrupt

NOW = 1000.0  # the loop's clock, as the tests give it


class RecordingWriter:
    """Stands in for the ledger writer: keeps each run's last status and columns."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}

    def start_runs(self, runs: Any) -> None:
        for run_id in runs.run_ids:
            self.runs[run_id] = {"status": RunStatus.QUEUED}

    def transition(self, run_id: str, status: RunStatus, **columns: Any) -> None:
        self.runs.setdefault(run_id, {}).update(columns, status=status)

    def add_event(self, *_: Any) -> int:
        return 1

    def finish_batch(self, *_: Any) -> None:
        pass

    def flush(self, wait: float | None = None) -> int:
        return 0


def make_batch(names: list[str], **config: Any) -> tuple[Batch, RecordingWriter]:
    writer = RecordingWriter()
    cfg = ParallelRoleConfig(**config)
    runs = [TrackedRun(i, name, name, str(uuid.uuid4()), cfg.timeout_for(name), policy=retry_policy(cfg, Role(name)))
            for i, name in enumerate(names)]
    return Batch(writer, "unit", cfg, runs), writer  # type: ignore[arg-type]


def dispatch_all(batch: Batch) -> dict[str, int]:
    chunks = list(batch.chunks_to_dispatch(lookahead=8, max_chunk=1, now=0.0))
    return {task.role: task.dispatch_id for chunk in chunks for task in chunk}


def failed(dispatch_id: int) -> Finished:
    error = ErrorInfo("ValueError", "planned")
    return Finished(dispatch_id, Outcome(OutcomeStatus.FAILED, error=error, duration_ms=1.0, finished_at=time.time()))


def test_a_role_not_started_because_of_a_failure_not_yet_heard_of_names_that_failure():
    """Issue 12 item 1: the reviewer's worker saw the cancel event before the tester's failure reached the loop."""
    batch, writer = make_batch(["tester", "reviewer"], fail_fast=True, max_concurrent=2)
    ids = dispatch_all(batch)
    batch.started(Started(ids["tester"], 1, "h", time.time()), NOW)
    batch.finished(Finished(ids["reviewer"], Outcome(OutcomeStatus.NOT_STARTED, stop_reason="cancelling")), NOW)
    assert batch.unfinished and batch.phase is BatchPhase.RUNNING  # held until its cause is known
    batch.finished(failed(ids["tester"]), NOW)
    tester, reviewer = batch.results()
    assert reviewer.status is RunStatus.CANCELLED and reviewer.reason is Reason.FAIL_FAST
    assert reviewer.cancelled_by == tester.run_id
    assert writer.runs[reviewer.run_id]["reason"] == Reason.FAIL_FAST.value
    assert not batch.unfinished


def test_a_role_that_stopped_for_a_failure_not_yet_heard_of_names_that_failure():
    """Like the one above, for a running role: it saw the cancel event, stopped, and its end arrived first."""
    batch, writer = make_batch(["fail", "stopper"], fail_fast=True, max_concurrent=2)
    ids = dispatch_all(batch)
    for name in ("fail", "stopper"):
        batch.started(Started(ids[name], 1, "h", time.time()), NOW)
    error = ErrorInfo("parroles.RoleCancelled", "stopping as asked")
    batch.finished(Finished(ids["stopper"], Outcome(OutcomeStatus.CANCELLED, error=error, duration_ms=1.0,
                                                    stop_reason="the batch is being cancelled")), NOW)
    assert batch.unfinished and batch.phase is BatchPhase.RUNNING  # held until its cause is known
    assert all(r is None or r.status is not RunStatus.CANCELLED for r in [run.result for run in batch.runs])
    batch.finished(failed(ids["fail"]), NOW)
    fail, stopper = batch.results()
    assert stopper.status is RunStatus.CANCELLED and stopper.reason is Reason.FAIL_FAST
    assert stopper.cancelled_by == fail.run_id and writer.runs[stopper.run_id]["reason"] == "fail_fast"
    assert not batch.unfinished


def test_a_kill_says_how_long_after_the_stop_it_came():
    """Issue 12 item 2: never 'after a grace of 5 s' when the grace had not run out."""
    batch, _ = make_batch(["a", "b"], max_concurrent=2, cancel_grace=5.0)
    ids = dispatch_all(batch)
    for name in ("a", "b"):
        batch.started(Started(ids[name], 1, "h", time.time()), NOW)
    batch.interrupted(Interrupt.of(signal.SIGINT), NOW)
    batch.lost(Lost(ids["a"], LossCause.KILLED, "worker process (pid 1) was killed"), NOW + 1.25)
    batch.interrupted(Interrupt.of(signal.SIGINT), NOW + 2)  # a second SIGINT
    batch.lost(Lost(ids["b"], LossCause.KILLED, "worker process (pid 2) was killed"), NOW + 2)
    a, b = batch.results()
    assert "grace of 5 s" not in a.error.message and "its grace is 5 s" in a.error.message
    assert "1.2 s after the role was told to stop" in a.error.message
    assert "a second signal cut its grace short" in b.error.message
    assert {a.reason, b.reason} == {Reason.INTERRUPTED}


def test_a_role_that_cancels_itself_unasked_is_not_blamed_on_the_channel():
    batch, _ = make_batch(["a"])
    ids = dispatch_all(batch)
    batch.started(Started(ids["a"], 1, "h", time.time()), NOW)
    error = ErrorInfo("parroles.RoleCancelled", "I stop")
    batch.finished(Finished(ids["a"], Outcome(OutcomeStatus.CANCELLED, error=error, duration_ms=1.0)), NOW)
    (result,) = batch.results()
    assert result.status is RunStatus.CANCELLED and result.reason is not Reason.CHANNEL_LOST


def test_chunks_grow_with_short_roles_and_stay_single_for_long_ones():
    """Short roles travel many to a chunk (about CHUNK_SECONDS of work), unknown or long ones alone."""
    from parroles.runner.ready import CHUNK_SECONDS

    batch, _ = make_batch([f"r{i}" for i in range(400)], max_concurrent=2)
    first = list(batch.chunks_to_dispatch(lookahead=2, max_chunk=64, now=0.0))
    assert first and all(len(chunk) == 1 for chunk in first)  # nothing measured yet
    for chunk in first:
        for task in chunk:
            batch.started(Started(task.dispatch_id, 1, "h", time.time()), NOW)
            done = Outcome(OutcomeStatus.COMPLETED, output_json="1", duration_ms=1.0, finished_at=time.time())
            batch.finished(Finished(task.dispatch_id, done), NOW)
    sized = list(batch.chunks_to_dispatch(lookahead=2, max_chunk=64, now=0.0))
    expected = min(64, int(CHUNK_SECONDS * 1000 / 1.0))
    assert len(sized[0]) == expected


def test_the_last_roles_are_shared_out_so_no_worker_waits_on_another():
    batch, _ = make_batch([f"r{i}" for i in range(12)], max_concurrent=2)
    for chunk in list(batch.chunks_to_dispatch(lookahead=0, max_chunk=64, now=0.0)):  # the first two: one each
        for task in chunk:
            batch.started(Started(task.dispatch_id, 1, "h", time.time()), NOW)
            batch.finished(Finished(task.dispatch_id, Outcome(OutcomeStatus.COMPLETED, "1", duration_ms=0.001)), NOW)
    sizes = [len(chunk) for chunk in batch.chunks_to_dispatch(lookahead=8, max_chunk=64, now=0.0)]
    assert sum(sizes) == 10 and max(sizes) <= 3  # a fair share of what is left, not one big chunk


def test_nothing_is_dispatched_once_the_batch_is_cancelled():
    batch, _ = make_batch(["a", "b", "c"], max_concurrent=1)
    list(batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0))
    batch.cancel(Reason.FAIL_FAST, NOW)
    assert list(batch.chunks_to_dispatch(lookahead=8, max_chunk=8, now=0.0)) == []
    assert [r.status for r in batch.results()] == [RunStatus.CANCELLED] * 2  # the queued ones, at once


def test_run_ids_are_version_4_uuids_as_uuid4_writes_them_and_unique():
    from parroles.runner.tracked import new_run_ids

    ids = new_run_ids(5000)
    parsed = [uuid.UUID(text) for text in ids]
    assert [str(value) for value in parsed] == ids  # the canonical text, lower-case, with its hyphens
    assert {value.version for value in parsed} == {4} and {value.variant for value in parsed} == {uuid.RFC_4122}
    assert len(set(ids)) == len(ids) and new_run_ids(0) == []
