"""One concurrency slot of the loky backend: a single-worker loky executor and what is known of its worker.

loky treats an executor as one failure domain: when any of its workers dies
it fails every pending call and kills the other workers. So each slot gets
an executor of its own with one worker: a worker's death (a crash, a kill
after a timeout's grace) breaks that slot only. ``backends.loky.backend`` decides
what runs where and reports what a dead slot lost; this module only holds
a slot's state and starts and stops its executor and worker.

A worker starts the loky way (a fresh interpreter) or, with the
``forkserver`` start method, forked from multiprocessing's fork server,
which has this package's worker code imported once (``SERVER_PRELOAD``):
a worker then costs a fork, not an interpreter start and its imports. Either
way the start happens on a thread of its own: the first fork waits for the
server to boot, and nobody else should.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing import resource_tracker
from typing import Any

from loky import ProcessPoolExecutor

from parroles.backends import START_LOCK
from parroles.backends.loky.lifeline import hold_group_signals
from parroles.backends.loky.worker import init_worker, ready, run_roles
from parroles.backends.process_tree import kill_group, kill_tree, may_have_children
from parroles.backends.protocol import Task
from parroles.errors import ConfigError

START_TIMEOUT = 60.0  # seconds a worker may take to start and say hello before it is killed (and replaced)
LAUNCH_WAIT = 2.0  # seconds stopping a slot waits for a worker start under way (a fork server's boot)
SERVER_PRELOAD = "parroles.backends.loky.server_preload"  # what the fork server imports before it forks
# A forked worker's end is told by the fork server: when the server dies, loky takes its workers for dead.
FORK_SERVER_DIED = "lost with the fork server it was forked from, which died (the worker was stopped)"
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
    start_timer: threading.Timer | None = None
    # Set once loky has started the worker process (or failed to): until then loky's own lock is held by the
    # boot thread, and a call handed over meanwhile would make the caller wait for the worker's start.
    launched: threading.Event = dataclasses.field(default_factory=threading.Event)

    @classmethod
    def start(cls, serial: int, address: str, authkey: bytes, parent_pid: int, start_method: str,
              on_boot: Callable[[Slot, Future[Any]], None], on_overdue: Callable[[Slot], None],
              workers: int = 1) -> Slot:
        """A new slot whose worker starts now, on a thread of its own (loky starts workers at the first call),
        one of ``workers`` (its thread cap is its share of the CPUs: ``backends.threads``).

        ``on_overdue`` is called if the worker has not said hello ``START_TIMEOUT`` seconds later.
        """
        executor = ProcessPoolExecutor(max_workers=1, initializer=init_worker, context=_context(start_method),
                                       initargs=(serial, address, authkey, parent_pid, workers))
        slot = cls(serial, executor)
        slot.in_flight.append(BOOT)
        slot.start_timer = threading.Timer(START_TIMEOUT, on_overdue, (slot,))
        slot.start_timer.daemon = True
        slot.start_timer.start()
        threading.Thread(target=slot._boot, args=(on_boot,), name=f"parroles-slot-{serial}-boot", daemon=True).start()
        return slot

    def _boot(self, on_boot: Callable[[Slot, Future[Any]], None]) -> None:
        try:
            with START_LOCK:  # loky starts the worker within this call
                # multiprocessing's resource tracker unblocks both signals on the thread that starts it (3.11):
                # started first, so that the block holds for the worker (and fork server) this thread starts.
                resource_tracker.ensure_running()
                hold_group_signals()
                future = self.executor.submit(ready)
        except Exception as exc:  # noqa: BLE001 - shut down before it started: the pool hears it as the boot's end
            future = Future()
            future.set_exception(exc)
        finally:
            self.launched.set()
        future.add_done_callback(lambda done: on_boot(self, done))

    @property
    def free(self) -> bool:
        """Serving, started, and no chunk of roles on it: the next chunk may go here."""
        return self.state.serving and self.launched.is_set() and all(chunk is BOOT for chunk in self.in_flight)

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

    def cancel_start_timeout(self) -> None:
        if self.start_timer is not None:
            self.start_timer.cancel()

    def kill_unannounced(self) -> None:
        """Kill a worker that has not said hello yet (so its pid is loky's alone) and what it started.

        It has not led a process group of its own yet: there is no group to kill.
        """
        for pid in list(getattr(self.executor, "_processes", None) or ()):
            kill_tree(pid, include_root=True)

    def stop(self) -> threading.Thread | None:
        """Stop the worker and what its roles started; returns loky's thread to join, if any."""
        busy = any(chunk is not BOOT for chunk in self.in_flight)
        self.cancel_start_timeout()  # a worker being stopped has no start to time
        # loky's thread exists once the worker was started: one left unjoined would block the interpreter's exit.
        if not self.launched.wait(LAUNCH_WAIT):
            # Its launch is stuck (a fork server that does not answer) and holds loky's lock, which shutdown
            # takes: the caller is not kept waiting for it; the executor shuts down once the launch returns.
            stopper = functools.partial(self.executor.shutdown, wait=False, kill_workers=True)
            threading.Thread(target=stopper, name=f"parroles-slot-{self.serial}-stop", daemon=True).start()
            return None
        if self.pid is None:
            # Not started yet, or stuck starting (a lock taken in a re-imported main module, say): it would
            # read loky's request to stop only once started, and loky's thread, joined at exit, waits for it.
            self.kill_unannounced()
            busy = True
        elif busy:
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


def check_this_process_may_start_workers() -> None:
    """Refuse, before anything starts or is written, where multiprocessing would fail later (or worse)."""
    process = multiprocessing.current_process()
    # multiprocessing's own test (spawn._check_not_importing_main): a worker re-imports the main module
    # (forkserver), and a call there without the __main__ guard would run a batch of its own from a worker.
    if getattr(process, "_inheriting", False):
        raise ConfigError("parroles was called while this process, a new worker, imported the main module: "
                          "put the call under `if __name__ == \"__main__\":`")
    if process.daemon:
        raise ConfigError("a daemonic process (a multiprocessing.Pool worker, say) may not start worker processes: "
                          "run parroles from a non-daemonic process")


def _context(start_method: str) -> Any:
    """The multiprocessing context loky starts a slot's worker with (None: loky's own)."""
    if start_method != "forkserver":
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([SERVER_PRELOAD])
    return context
