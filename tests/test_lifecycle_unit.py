"""A run's life as one table, and every deadline on an injected clock: no processes, no sleeping (issue 22)."""

from __future__ import annotations

import itertools
import signal
import time

import pytest
from test_batch_unit import NOW, dispatch_all, make_batch

from parroles import InvalidTransition
from parroles.backends.protocol import Finished, LossCause, Lost, Outcome, OutcomeStatus, Started
from parroles.results import Reason, RunStatus
from parroles.runner.commands import KillRun, StopAll, StopRun
from parroles.runner.lifecycle import TRANSITIONS, Happening, RunState, next_state
from parroles.runner.tracked import Interrupt


def test_the_table_is_total_every_pair_moves_or_raises():
    for state, happening in itertools.product(RunState, Happening):
        if (state, happening) in TRANSITIONS:
            assert next_state(state, happening) is TRANSITIONS[state, happening]
        else:
            with pytest.raises(InvalidTransition, match=f"a run {state.value} cannot be {happening.value}"):
                next_state(state, happening)
    assert not any(state is RunState.ENDED for state, _ in TRANSITIONS)  # nothing leaves the end


def start(batch, ids, name, at=NOW):
    return batch.started(Started(ids[name], 1, "h", time.time()), at)


def test_a_timeout_tells_then_kills_at_its_deadlines_once_each():
    batch, _ = make_batch(["slow"], role_timeout=5.0, cancel_grace=2.0)
    ids = dispatch_all(batch)
    start(batch, ids, "slow")
    assert batch.seconds_to_next_deadline(NOW) == 5.0
    assert batch.due(NOW + 4.99) == []
    assert batch.due(NOW + 5.0) == [StopRun(ids["slow"], "timed out after 5 s")]
    assert batch.runs[0].state is RunState.STOPPING and batch.seconds_to_next_deadline(NOW + 5) == 2.0
    assert batch.due(NOW + 6.99) == []
    assert batch.due(NOW + 7.0) == [KillRun(ids["slow"])]
    assert batch.due(NOW + 60) == [] and batch.seconds_to_next_deadline(NOW + 60) is None
    batch.lost(Lost(ids["slow"], LossCause.KILLED, "worker process (pid 1) was killed"), NOW + 7.1)
    (result,) = batch.results()
    assert result.reason is Reason.TIMEOUT and "2.1 s after the role was told to stop" in result.error.traceback


def test_a_cancel_stops_all_and_kills_after_the_grace_even_a_role_that_never_starts():
    batch, writer = make_batch(["running", "stuck", "queued"], max_concurrent=2, cancel_grace=3.0)
    ids = {task.role: task.dispatch_id for chunk in batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0)
           for task in chunk}
    assert list(ids) == ["running", "stuck"]
    start(batch, ids, "running")
    assert batch.cancel(Reason.FAIL_FAST, NOW) == [StopAll()]
    assert batch.cancel(Reason.FAIL_FAST, NOW) == []  # once
    assert writer.runs[batch.runs[2].run_id]["status"] is RunStatus.CANCELLED  # never dispatched: at once
    assert [run.state for run in batch.runs[:2]] == [RunState.STOPPING, RunState.STOPPING]
    assert batch.due(NOW + 2.9) == []
    assert sorted(batch.due(NOW + 3.0), key=lambda c: c.dispatch_id) == [KillRun(ids["running"]),
                                                                           KillRun(ids["stuck"])]


def test_a_role_that_starts_after_the_cancel_gets_its_grace_from_its_start():
    batch, _ = make_batch(["late"], cancel_grace=3.0)
    ids = dispatch_all(batch)
    batch.cancel(Reason.INTERRUPTED, NOW)
    start(batch, ids, "late", at=NOW + 2)
    assert batch.due(NOW + 3.5) == [] and batch.due(NOW + 5) == [KillRun(ids["late"])]


def test_a_second_signal_cuts_every_grace_short():
    batch, _ = make_batch(["a"], cancel_grace=30.0)
    ids = dispatch_all(batch)
    start(batch, ids, "a")
    assert batch.interrupted(Interrupt.of(signal.SIGINT), NOW) == [StopAll()]
    assert batch.due(NOW + 1) == []
    assert batch.interrupted(Interrupt.of(signal.SIGINT), NOW + 1) == []
    assert batch.due(NOW + 1) == [KillRun(ids["a"])]


def test_messages_out_of_order_are_refused_not_absorbed():
    batch, _ = make_batch(["a"])
    ids = dispatch_all(batch)
    start(batch, ids, "a")
    done = Finished(ids["a"], Outcome(OutcomeStatus.COMPLETED, "1", duration_ms=1.0))
    batch.finished(done, NOW)
    assert batch.finished(done, NOW) == []  # a report of a run already ended is not its to act on
    with pytest.raises(InvalidTransition):
        batch.runs[0].move(Happening.STARTED)
