"""One concurrency slot of the loky backend: a single-worker loky executor and what is known of its worker.

loky treats an executor as one failure domain: when any of its workers dies
it fails every pending call and kills the other workers. So each slot gets
an executor of its own with one worker: a worker's death (a crash, a kill
after a timeout's grace) breaks that slot only. ``loky_backend`` decides
what runs where and reports what a dead slot lost; this module only holds
a slot's state and starts and stops its executor and worker.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loky import ProcessPoolExecutor

from parroles.backends.loky.process_tree import kill_group, kill_tree, may_have_children
from parroles.backends.loky.worker import init_worker, ready, run_roles
from parroles.backends.protocol import Task

Chunk = tuple[Task, ...]
BOOT: Chunk = ()  # the in-flight entry of the call that starts a slot's worker


class SlotState(enum.Enum):
    BOOTING = "booting"  # its worker is starting and has not joined the channel yet
    READY = "ready"  # its worker is on the channel
    DYING = "dying"  # its worker died; the rest of its messages and loky's verdict are awaited
    DEAD = "dead"  # what it was given has been accounted for
    STOPPED = "stopped"  # shut down on purpose

    @property
    def serving(self) -> bool:
        return self in (SlotState.BOOTING, SlotState.READY)


@dataclasses.dataclass(eq=False)
class Slot:
    serial: int  # unique in its pool; the worker names it in its hello
    executor: ProcessPoolExecutor
    state: SlotState = SlotState.BOOTING
    pid: int | None = None  # the worker's, from its hello
    in_flight: list[Chunk] = dataclasses.field(default_factory=list)  # submitted, future not done, oldest first
    killed_for: int | None = None  # the dispatch whose grace ran out, when the parent killed the worker
    death: str = ""  # how the worker died, as loky told
    settle_timer: threading.Timer | None = None

    @classmethod
    def start(cls, serial: int, address: str, authkey: bytes, parent_pid: int,
              on_boot: Callable[[Slot, Future[Any]], None]) -> Slot:
        """A new slot whose worker starts now (loky starts workers at the first call)."""
        executor = ProcessPoolExecutor(max_workers=1, initializer=init_worker,
                                       initargs=(serial, address, authkey, parent_pid))
        slot = cls(serial, executor)
        slot.in_flight.append(BOOT)
        executor.submit(ready).add_done_callback(lambda future: on_boot(slot, future))
        return slot

    @property
    def free(self) -> bool:
        """Serving, and no chunk of roles on it: the next chunk may go here."""
        return self.state.serving and all(chunk is BOOT for chunk in self.in_flight)

    def submit(self, key: str, chunk: Chunk) -> Future[int]:
        """Hand ``chunk`` to this slot's worker (may raise loky's errors if the executor is broken)."""
        future: Future[int] = self.executor.submit(run_roles, key, list(chunk))
        self.in_flight.append(chunk)
        return future

    def done(self, chunk: Chunk) -> None:
        """The future of ``chunk`` is done, one way or another."""
        for i, entry in enumerate(self.in_flight):
            if entry is chunk:
                del self.in_flight[i]
                return

    def kill(self) -> None:
        """Kill the worker and everything under it, whatever group or session it moved to."""
        if self.pid is not None:
            kill_tree(self.pid, include_root=True)
            kill_group(self.pid)

    def stop(self) -> threading.Thread | None:
        """Stop the worker and what its roles started; returns loky's thread to join, if any."""
        busy = any(chunk is not BOOT for chunk in self.in_flight)
        if self.pid is not None:
            if busy:
                self.kill()
            elif may_have_children(self.pid):
                kill_tree(self.pid, include_root=False)
        # Flag them all first and join after (``join``), so N workers stop side by side.
        thread: threading.Thread | None = getattr(self.executor, "_executor_manager_thread", None)
        self.executor.shutdown(wait=False, kill_workers=busy)
        return thread

    def kill_group(self) -> None:
        """Kill what is left in the worker's process group (once the worker is gone)."""
        if self.pid is not None:
            kill_group(self.pid)
