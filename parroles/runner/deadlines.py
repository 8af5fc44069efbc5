"""What the loop's clock says is due: retries whose delay is over, timeouts, graces that ran out.

Times are the loop's clock (monotonic seconds), passed in: every deadline is
testable without sleeping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from parroles.results import Reason
from parroles.runner.commands import Command, KillRun, StopRun
from parroles.runner.lifecycle import Happening, Stop
from parroles.runner.tracked import TrackedRun


def retries_due(backing_off: list[TrackedRun], now: float) -> list[TrackedRun]:
    """The attempts whose delay is over, taken out of ``backing_off`` and READY (recorded ready now)."""
    due = [run for run in backing_off if run.retry_at is not None and run.retry_at <= now]
    for run in due:
        backing_off.remove(run)
        run.move(Happening.RETRY_DUE)
        run.retry_at, run.ready_at = None, time.time()
    return due


def stops_due(dispatched: Iterable[TrackedRun], now: float, grace: float) -> list[Command]:
    """Roles whose own timeout expired are told to stop, roles whose grace ran out are killed (each once)."""
    commands: list[Command] = []
    for run in dispatched:
        if run.timeout_at is not None and run.timeout_at <= now:
            run.timeout_at = None
            if run.stop is None:
                assert run.dispatch_id is not None and run.timeout is not None
                run.stop = Stop(Reason.TIMEOUT, now, now + grace)
                run.move(Happening.TOLD_TO_STOP)
                commands.append(StopRun(run.dispatch_id, f"timed out after {run.timeout:g} s"))
        if run.stop is not None and run.stop.kill_at is not None and run.stop.kill_at <= now:
            assert run.dispatch_id is not None
            run.stop = dataclasses.replace(run.stop, kill_at=None)
            commands.append(KillRun(run.dispatch_id))
    return commands


def next_deadline(dispatched: Iterable[TrackedRun], backing_off: Iterable[TrackedRun]) -> float | None:
    """The earliest timeout, kill or retry to come, on the loop's clock; None if there is none."""
    dues = [due for run in dispatched
            for due in (run.timeout_at, run.stop.kill_at if run.stop else None) if due is not None]
    dues += [run.retry_at for run in backing_off if run.retry_at is not None]
    return min(dues) if dues else None
