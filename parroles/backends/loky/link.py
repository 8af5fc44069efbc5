"""What one batch has on a loky pool: its queue of chunks, which slot holds which role, what started and ended.

Parent side. ``backends.loky.backend`` owns the pool and its lock and calls in here
with the lock held; this module decides, for a slot whose worker died, what
each role it held becomes: the one that was running there is ``Lost``, the
ones that never started go back to the head of the queue (their first
start is still to come).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from parroles.backends.loky.slot import FORK_SERVER_DIED, Chunk, Slot
from parroles.backends.protocol import (
    Event,
    Finished,
    Inbox,
    Logs,
    LossCause,
    Lost,
    Outcome,
    OutcomeStatus,
    Started,
    Task,
)

MAX_REQUEUES = 3  # times a role may be handed back unstarted by slots that died on their own before it is failed


@dataclasses.dataclass
class BatchLink:
    """The batch being served, as the pool sees it."""

    key: str
    payload: bytes  # each worker gets it once, on the channel: the executor blob, sys.path entries, the cancel event
    event: Any  # the batch's cancel event (a Manager Event proxy)
    inbox: Inbox
    queue: collections.deque[Chunk] = dataclasses.field(default_factory=collections.deque)  # not on a slot yet
    handed: dict[int, tuple[Slot, Task]] = dataclasses.field(default_factory=dict)  # on a slot, not ended
    started_on: dict[int, int] = dataclasses.field(default_factory=dict)  # dispatch id -> worker pid
    ended: set[int] = dataclasses.field(default_factory=set)
    requeued: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    cancelled: bool = False  # stop_all was called: nothing more starts

    def hand(self, slot: Slot, chunk: Chunk) -> None:
        for task in chunk:
            self.handed[task.dispatch_id] = (slot, task)

    def slot_of(self, dispatch_id: int) -> Slot | None:
        held = self.handed.get(dispatch_id)
        return held[0] if held is not None else None

    def forward(self, slot: Slot, message: Started | Event | Logs | Finished) -> None:
        """A message from ``slot``'s worker about a role it was handed (a stale slot's are dropped)."""
        if self.slot_of(message.dispatch_id) is not slot:
            return
        if isinstance(message, Started):
            self.started_on[message.dispatch_id] = message.pid
        if isinstance(message, Finished):
            self.end(message)
        else:
            self.inbox(message)

    def end(self, message: Finished | Lost) -> None:
        """Report a role's end, once."""
        if message.dispatch_id not in self.ended:
            self.ended.add(message.dispatch_id)
            self.handed.pop(message.dispatch_id, None)
            self.inbox(message)

    def cancel_queued(self) -> None:
        """The batch is stopping: roles not yet on a slot end now, never started."""
        self.cancelled = True
        while self.queue:
            for task in self.queue.popleft():
                self.end(not_started(task))

    def take_back(self, slot: Slot, max_chunk: int) -> None:
        """``slot``'s worker died: report the role that ran there, queue again those that never started."""
        lost: list[int] = []
        unstarted: list[Task] = []
        for dispatch_id, (holder, task) in list(self.handed.items()):
            if holder is slot:
                if slot.pid is not None and self.started_on.get(dispatch_id) == slot.pid:
                    lost.append(dispatch_id)
                else:
                    unstarted.append(task)
        # The roles that died first, so their failure (and any fail-fast it causes) is known first.
        for dispatch_id in lost:
            self.end(_loss(slot, dispatch_id))
        again: list[Task] = []
        for task in unstarted:
            # A worker the parent killed on purpose (a role's memory_limit, its timeout's grace) says nothing of
            # the roles queued behind it on that worker: only deaths of their own count towards giving up on them.
            if slot.killed_for is None:
                self.requeued[task.dispatch_id] += 1
            if self.cancelled:
                self.end(not_started(task))
            elif self.requeued[task.dispatch_id] > MAX_REQUEUES:
                why = f"{_named(slot)} died before the role started: {slot.death or 'no exit code'}"
                self.end(Lost(task.dispatch_id, LossCause.CRASH, why))
            else:
                del self.handed[task.dispatch_id]
                again.append(task)
        for start in reversed(range(0, len(again), max_chunk)):
            self.queue.appendleft(tuple(again[start:start + max_chunk]))


def _named(slot: Slot) -> str:
    # A worker says its pid in its hello: one that died before (while importing, say) has none to show.
    return f"worker process (pid {slot.pid})" if slot.pid is not None else "worker process (still starting)"


def _loss(slot: Slot, dispatch_id: int) -> Lost:
    if slot.killed_for == dispatch_id:
        return Lost(dispatch_id, LossCause.KILLED, f"{_named(slot)} was killed")
    if slot.killed_for is not None:  # it started just as the role before it was being killed
        why = f"{_named(slot)} was killed while it stopped another role"
        return Lost(dispatch_id, LossCause.CRASH, why)
    if slot.death == FORK_SERVER_DIED:
        return Lost(dispatch_id, LossCause.CRASH, f"{_named(slot)} {FORK_SERVER_DIED}")
    # No death yet: settled by the safety net, before loky told the exit code (see ``backend.SETTLE_TIMEOUT``).
    return Lost(dispatch_id, LossCause.CRASH, f"{_named(slot)} died: {slot.death or 'no exit code known'}")


def not_started(task: Task, why: str = "the batch is being cancelled") -> Finished:
    return Finished(task.dispatch_id, Outcome(OutcomeStatus.NOT_STARTED, stop_reason=why))
