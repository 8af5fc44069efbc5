"""A run's life as data: its states, what moves it, and the one table of moves (parent process only).

Every run of a batch is in exactly one ``RunState``. Something that happens
to it (a ``Happening``) moves it along ``TRANSITIONS``, and only along it:
``move`` refuses any other move (``InvalidTransition``), as dask's scheduler
does, so a message that arrives in an order nobody planned for is an error
that says so instead of a run in two states at once.

    BACKING_OFF ──retry due──┐   (a retry's next attempt: a run of its own, born here)
                             ▼
    WAITING ──needs met──▶ READY ──dispatched──▶ DISPATCHED ──started──▶ RUNNING
       │                     │          saw a cancel  told to stop   told │  │ saw a cancel
       │                     │                  ▼    ▼                    ▼  ▼
       │                     │                HELD  STOPPING ◀────────────┘ HELD
       └─────── ended ───────┴──── ended ───────┴───────┴──── ended ───────────▶ ENDED
                             └──── reused (its cache key found a completed run: runner.reuse) ──▶ ENDED

Why a run stops is one ``Stop`` value: the reason, when it was told, and
when its worker is to be killed if it has not ended by then. The times are
the loop's clock (monotonic seconds), passed in, never read here, so every
deadline is testable without sleeping.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from parroles.errors import InvalidTransition
from parroles.results import Reason


class _Member(enum.Enum):
    """Hashed as the object it is: Enum's own ``__hash__`` is Python code, and a run's every move hashes two."""

    __hash__ = object.__hash__


class RunState(_Member):
    WAITING = "waiting"  # for the roles it needs
    BACKING_OFF = "backing off"  # a retry: waiting out its delay, holding no slot
    READY = "ready"  # in the parent's own queue, in batch order
    DISPATCHED = "dispatched"  # handed to the backend, not started
    HELD = "held"  # its worker saw the batch's cancel before this loop heard why: held until it has
    RUNNING = "running"  # its worker reported its start
    STOPPING = "stopping"  # told to stop: its Stop says why, and when its worker is killed
    ENDED = "ended"  # terminal in the ledger


class Happening(_Member):
    NEEDS_MET = "needs met"  # every role it needs has ended as it requires
    RETRY_DUE = "retry due"  # its delay before another attempt is over
    DISPATCHED = "dispatched"
    STARTED = "started"
    SAW_CANCEL = "saw a cancel"  # not started, or stopped, because of a cancel the loop has not heard of yet
    TOLD_TO_STOP = "told to stop"  # its own timeout, fail-fast, a signal, the cancel channel lost
    ENDED = "ended"  # finished, lost, or cancelled (upstream, or with the batch)
    REUSED = "reused"  # a completed run with its cache key was found: COMPLETED without running


S, H = RunState, Happening
TRANSITIONS: Mapping[tuple[RunState, Happening], RunState] = {
    (S.WAITING, H.NEEDS_MET): S.READY,
    (S.WAITING, H.ENDED): S.ENDED,
    (S.BACKING_OFF, H.RETRY_DUE): S.READY,  # an attempt after a failure: a new run, born BACKING_OFF
    (S.BACKING_OFF, H.ENDED): S.ENDED,  # the batch was cancelled during its delay
    (S.READY, H.DISPATCHED): S.DISPATCHED,
    (S.READY, H.ENDED): S.ENDED,
    (S.READY, H.REUSED): S.ENDED,  # about to be dispatched, its key found a completed run (runner.reuse)
    (S.DISPATCHED, H.STARTED): S.RUNNING,
    (S.DISPATCHED, H.SAW_CANCEL): S.HELD,
    (S.DISPATCHED, H.TOLD_TO_STOP): S.STOPPING,  # its kill deadline holds even if it never starts
    (S.DISPATCHED, H.ENDED): S.ENDED,
    (S.HELD, H.ENDED): S.ENDED,
    (S.RUNNING, H.SAW_CANCEL): S.HELD,
    (S.RUNNING, H.TOLD_TO_STOP): S.STOPPING,
    (S.RUNNING, H.ENDED): S.ENDED,
    (S.STOPPING, H.STARTED): S.STOPPING,  # told before it started: it starts told
    (S.STOPPING, H.TOLD_TO_STOP): S.STOPPING,  # told again: a second signal cuts its grace
    (S.STOPPING, H.ENDED): S.ENDED,
}
del S, H


def next_state(state: RunState, happening: Happening) -> RunState:
    """Where ``happening`` moves a run in ``state``; InvalidTransition where the table has no such move."""
    try:
        return TRANSITIONS[state, happening]
    except KeyError:
        raise InvalidTransition(f"a run {state.value} cannot be {happening.value}") from None


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why a run was told to stop, when (loop clock), and when its worker is killed if it has not ended."""

    reason: Reason
    told_at: float
    kill_at: float | None  # None once the kill was ordered
    grace_cut: bool = False  # a second signal ended its grace early

    def cut(self, now: float) -> Stop:
        """A second signal: kill now, and say so."""
        return dataclasses.replace(self, kill_at=now if self.kill_at is not None else None, grace_cut=True)
