"""The loky backend: roles in local worker processes, and the one place loky's failures become parroles' own.

A ``LokyBackend`` is a pool: a Manager (cancel events, ``events``), a ``Channel``
and ``max_workers`` slots, each a single-worker loky executor with a failure
domain of its own (``loky_slot``). It serves one batch at a time
(``attach``/``detach``); between batches ``loky_pool`` keeps it idle, so the
next batch starts on warm workers. Per batch it makes a fresh cancel event
and a payload that each worker gets once, on the channel (chunks carry only
the batch's key; see ``worker``).

Chunks wait in the pool's own queue and go to a free slot, one chunk per
slot at a time. When a worker dies, loky fails the calls of its slot only;
this module then finds out which role died (each worker reported its pid
when the role started), waits until the channel has delivered the dead
worker's last messages, reports that role ``Lost``, hands the roles queued
there that never started to other slots (their first start is still to
come), and starts a new slot in its place when there is work for it. Roles
running on other slots never notice.

A dead worker's slot settles on two facts: loky failed its calls (it tells
the exit code), and the channel hit EOF for the worker (its every message has
arrived). A process forked from a worker drops its copy of the channel at the
fork (``worker._drop_channel_in_child``), so the EOF comes as the worker dies.
loky (its own start method) hears of a death through a pipe such a child
holds too: on an EOF first, what is left in the worker's process group is
killed at once, and loky's verdict follows. ``SETTLE_TIMEOUT`` is only a safety
net, for a child that holds one of the two all the same: forked without
Python's at-fork hooks (a C library's ``fork()``), or out of the worker's
process group (``setsid``) holding loky's pipe. (Not covered: a C-forked child
of a worker started loky's way holds both; its worker's death waits for it.)
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from loky.process_executor import BrokenProcessPool, ShutdownExecutorError, TerminatedWorkerError

from parroles.backends import BackendOptions, LokyOptions
from parroles.backends.loky import pool as loky_pool
from parroles.backends.loky.channel import Channel
from parroles.backends.loky.events import CancelEvents
from parroles.backends.loky.link import BatchLink
from parroles.backends.loky.messages import Cancel, ChannelMessage, Hello, Sweep
from parroles.backends.loky.slot import (
    BOOT,
    FORK_SERVER_DIED,
    Chunk,
    Slot,
    SlotState,
    check_this_process_may_start_workers,
)
from parroles.backends.loky.worker import batch_payload
from parroles.backends.process_tree import kill_descendants, outlives
from parroles.backends.protocol import ChannelLost, Event, Finished, Inbox, Logs, Outcome, Started, Task

SETTLE_TIMEOUT = 3.0  # the safety net: longest a dead worker's slot waits for its second fact (module docstring)
JOIN_TIMEOUT = 3.0  # longest shutting down waits for each slot's loky thread
DYING_WAIT = 0.5  # how long a forked worker that loky calls dead may take to exit before its fork server is blamed
_EXIT_CODES = re.compile(r"The exit codes of the workers are \{(?P<codes>[^}]*)\}")


class LokyBackend:
    """A pool of local loky workers serving one batch at a time; see the module docstring."""

    name = "loky"
    lookahead = 8
    max_chunk = 64

    @classmethod
    def open(cls, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
             options: BackendOptions) -> LokyBackend:
        assert isinstance(options, LokyOptions)
        pool = loky_pool.take(max_workers, options.max_concurrent, options.start_method)
        if pool is not None:
            try:
                pool.attach(executor_blob, sys_path, inbox)
            except Exception:  # noqa: BLE001 - it broke while idle (its Manager died): start afresh
                pool.shutdown()
                pool = None
        if pool is None:
            pool = cls(max_workers, options.start_method)
            pool.attach(executor_blob, sys_path, inbox)
        pool._idle_timeout = options.idle_worker_timeout
        return pool

    @classmethod
    def start_workers(cls, max_workers: int, options: BackendOptions) -> None:
        """Boot a pool now and keep it idle, so that the next batch of ``max_workers`` takes it warm."""
        assert isinstance(options, LokyOptions)
        idle = loky_pool.idle_pool()
        if idle is not None and idle.fits(max_workers, max_workers, options.start_method) and idle.healthy():
            return
        pool = cls(max_workers, options.start_method)
        loky_pool.keep(pool, max(options.idle_worker_timeout, loky_pool.STARTED_AHEAD_WAIT))

    def __init__(self, max_workers: int, start_method: str = "loky") -> None:
        check_this_process_may_start_workers()
        self.max_workers = max_workers
        self.start_method = start_method
        self._idle_timeout = 0.0
        self._lock = threading.RLock()
        self._positions: list[Slot | None] = [None] * max_workers  # the slots that take work
        self._slots: dict[int, Slot] = {}  # serial -> slot, serving or dying
        self._by_pid: dict[int, Slot] = {}
        self._serials = itertools.count(1)
        self._closing = False
        self._batch: BatchLink | None = None
        self._events = CancelEvents(self._events_lost)  # a fork: before this pool starts any thread of its own
        self._channel = Channel(self._on_message, self._on_gone)
        with self._lock:  # every worker starts booting now, before a batch is attached
            self._positions = [self._new_slot() for _ in range(max_workers)]

    # -- a batch's use of the pool --------------------------------------------------------

    def attach(self, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox) -> None:
        """Serve a new batch: a fresh cancel event, and a new worker in each slot whose worker died."""
        event = self._events.new()
        key = uuid.uuid4().hex
        with self._lock:
            link = self._batch = BatchLink(key, batch_payload(executor_blob, sys_path, event), event, inbox)
            for i, slot in enumerate(self._positions):
                if slot is None:
                    self._positions[i] = self._new_slot()  # it boots while the parent prepares the batch
                elif slot.state is SlotState.READY and slot.pid is not None:
                    self._channel.send_batch(slot.pid, link.key, link.payload)
                # a BOOTING worker gets the payload with its hello

    def worker_pids(self) -> list[int | None]:
        """Each slot's worker process, by position; None for one that has not joined the channel yet."""
        with self._lock:
            return [slot.pid if slot is not None else None for slot in self._positions]

    def detach(self) -> None:
        """The batch is over: stop what its roles started and release its cancel event."""
        with self._lock:
            link, self._batch = self._batch, None
            workers = {slot.pid for slot in self._positions
                       if slot is not None and slot.state is SlotState.READY and slot.pid is not None}
        kill_descendants(workers)
        for pid in workers:
            self._channel.send(pid, Sweep())  # the worker reaps them (and kills any the parent missed)
        if link is not None:
            try:
                link.event.set()  # lets each worker's waiter thread for this batch return
            except Exception:  # noqa: BLE001 - the Manager is gone; nothing is waiting then
                pass

    @property
    def manager_pid(self) -> int:
        """The pid of this pool's Manager process (the batches' cancel events live there)."""
        return self._events.pid

    def fits(self, needed: int, limit: int, start_method: str) -> bool:
        """Whether a batch that needs ``needed`` to ``limit`` workers, started so, can use this pool."""
        return needed <= self.max_workers <= limit and self.start_method == start_method

    def healthy(self) -> bool:
        return not self._closing and self._events.alive()

    # -- the Backend interface -----------------------------------------------------------

    def submit(self, chunk: Sequence[Task]) -> None:
        with self._lock:
            link = self._batch
            assert link is not None, "submit outside a batch"
            link.queue.append(tuple(chunk))
            self._fill(link)

    def stop_all(self) -> None:
        link = self._batch
        if link is None:
            return
        try:
            link.event.set()
        except Exception:  # noqa: BLE001 - the Manager is gone; the watcher reports it
            pass
        with self._lock:
            link.cancel_queued()

    def stop(self, dispatch_id: int, why: str) -> None:
        with self._lock:
            pid = self._batch.started_on.get(dispatch_id) if self._batch is not None else None
        if pid is not None:
            self._channel.send(pid, Cancel(dispatch_id, why))

    def kill(self, dispatch_id: int) -> None:
        with self._lock:
            link = self._batch
            if link is None or dispatch_id in link.ended:
                return
            slot, pid = link.slot_of(dispatch_id), link.started_on.get(dispatch_id)
            if slot is None:
                return
            if pid is None and slot.state is SlotState.BOOTING:
                # Handed to a worker that never said hello (stuck importing, stopped): nothing of it ran.
                # loky then fails the slot's calls, and a cancelled batch ends them as not started.
                kill = slot.kill_unannounced
            elif pid is not None and slot.pid == pid and slot.state is SlotState.READY:
                slot.killed_for = dispatch_id
                kill = slot.kill  # loky sees the worker die and fails this slot's calls: _on_done reports it
            else:
                return
        kill()

    def close(self, ended_cleanly: bool) -> None:
        """Workers of a batch that ended cleanly are kept idle for the next one (``pool``)."""
        self.detach()
        if ended_cleanly and self._idle_timeout > 0 and self.healthy():
            loky_pool.keep(self, self._idle_timeout)
        else:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the workers, the Manager and the channel (and whatever the roles started)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            slots = list(self._slots.values())
            for slot in slots:
                slot.state = SlotState.STOPPED
                if slot.settle_timer is not None:
                    slot.settle_timer.cancel()
        threads = [slot.stop() for slot in slots]
        for thread in threads:
            if thread is not None:
                thread.join(timeout=JOIN_TIMEOUT)
        for slot in slots:
            slot.kill_group()
        self._events.shutdown()
        self._channel.close()

    # -- placing chunks on slots -------------------------------------------------------------

    def _new_slot(self) -> Slot:
        serial = next(self._serials)
        slot = Slot.start(serial, self._channel.address, self._channel.authkey, os.getpid(), self.start_method,
                          self._on_boot, self._start_overdue, self.max_workers)
        self._slots[serial] = slot
        return slot

    def _free_slot(self) -> Slot | None:
        for slot in self._positions:
            if slot is not None and slot.free:
                return slot
        for i, slot in enumerate(self._positions):
            if slot is None:  # its worker died: a new one takes its place, now that there is work
                slot = self._positions[i] = self._new_slot()
                return slot
        return None

    def _fill(self, link: BatchLink) -> None:
        """Hand queued chunks to free slots (the lock is held)."""
        while link.queue and not link.cancelled and not self._closing:
            slot = self._free_slot()
            if slot is None:
                return
            chunk = link.queue.popleft()
            try:
                future = slot.submit(link.key, chunk)
            except BrokenProcessPool as exc:  # its worker died while idle, and loky knows first
                link.queue.appendleft(chunk)
                self._slot_died(slot, _death(exc))
                continue
            except (ShutdownExecutorError, RuntimeError) as exc:  # the interpreter is exiting
                for task in chunk:
                    link.end(Finished(task.dispatch_id, Outcome.failed(exc)))
                continue
            link.hand(slot, chunk)  # before any of its messages: they need the lock held here
            future.add_done_callback(functools.partial(self._on_done, slot, chunk, link))

    # -- what workers and loky report --------------------------------------------------------

    def _on_message(self, pid: int, message: ChannelMessage) -> None:
        with self._lock:
            link = self._batch
            if isinstance(message, Hello):
                slot = self._slots.get(message.slot)
                if slot is not None and slot.state is SlotState.BOOTING:
                    slot.pid, slot.state = pid, SlotState.READY
                    slot.cancel_start_timeout()
                    self._by_pid[pid] = slot
                    if link is not None:
                        self._channel.send_batch(pid, link.key, link.payload)
                return
            slot = self._by_pid.get(pid)
            if link is None or slot is None:
                return  # a late message of a batch that is over
            if isinstance(message, (Started, Event, Logs, Finished)):
                link.forward(slot, message)

    def _on_gone(self, pid: int) -> None:
        """The channel hit EOF for worker ``pid``: the worker is gone (its forked children dropped their copies)."""
        with self._lock:
            slot = self._by_pid.get(pid)
            if slot is not None:
                self._slot_died(slot, "")
                if slot.state is SlotState.DYING:
                    # loky has not failed its calls yet: a child the worker forked in its group may hold the pipe
                    # loky watches. It goes now, as settling would kill it, so that loky's verdict follows.
                    slot.kill_group()

    def _start_overdue(self, slot: Slot) -> None:
        """Its worker has not said hello in time: killed, so that what it was given goes to another worker."""
        with self._lock:  # no hello slips in between the look and the kill
            if slot.state is SlotState.BOOTING and not self._closing and slot.start_timer is not None:
                slot.death = f"killed, as it had not started within {slot.start_timer.interval:g} s"
                slot.kill_unannounced()  # loky fails the slot's calls; _on_done takes it from there

    def _on_boot(self, slot: Slot, future: Future[Any]) -> None:
        self._on_done(slot, BOOT, None, future)

    def _on_done(self, slot: Slot, chunk: Chunk, link: BatchLink | None, future: Future[Any]) -> None:
        exc = future.exception()
        with self._lock:
            slot.done(chunk)
            if slot.state is SlotState.STOPPED:
                return
            if isinstance(exc, BrokenProcessPool):
                self._slot_died(slot, _death(exc))
            elif exc is not None and link is not None:
                # parroles' own worker code failed: the roles it did not finish cannot be trusted to run again.
                for task in chunk:
                    link.end(Finished(task.dispatch_id, Outcome.failed(exc)))
            self._settle_if_ready(slot)
            if self._batch is not None:
                self._fill(self._batch)

    # -- a slot whose worker died ------------------------------------------------------------

    def _slot_died(self, slot: Slot, death: str) -> None:
        """Its worker is gone (loky or the channel said so first): take it out of service (the lock is held)."""
        if self.start_method == "forkserver" and slot.pid is not None and outlives(slot.pid, DYING_WAIT):
            # loky hears of a forked worker's end from the fork server: the server died, not the worker. The
            # slot is broken all the same (loky gave it up), so its worker is stopped, and the death says so.
            # (A worker heard of through its closed channel may still be exiting: hence the wait, not a look.)
            death = FORK_SERVER_DIED
            slot.kill()
        slot.death = slot.death or death
        if not slot.state.serving:
            self._settle_if_ready(slot)
            return
        slot.state = SlotState.DYING
        self._positions = [None if s is slot else s for s in self._positions]
        slot.settle_timer = threading.Timer(SETTLE_TIMEOUT, self._settle, (slot,))
        slot.settle_timer.daemon = True
        slot.settle_timer.start()
        self._settle_if_ready(slot)

    def _settle_if_ready(self, slot: Slot) -> None:
        """Settle once loky has failed every call of the slot and the channel delivered its last message."""
        if slot.state is not SlotState.DYING or slot.in_flight:
            return
        if slot.pid is not None and self._channel.connected(slot.pid):
            return
        self._settle(slot)

    def _settle(self, slot: Slot) -> None:
        """Report what the dead slot was given and had not finished; queue again what never started."""
        with self._lock:
            if slot.state is not SlotState.DYING:
                return
            slot.state = SlotState.DEAD
            if slot.settle_timer is not None:
                slot.settle_timer.cancel()
            self._slots.pop(slot.serial, None)
            if slot.pid is not None:
                self._by_pid.pop(slot.pid, None)
            slot.kill_group()  # what its role left in its process group
            link = self._batch
            if link is None:
                return
            link.take_back(slot, self.max_chunk)
            self._fill(link)

    def _events_lost(self, detail: str) -> None:
        with self._lock:
            link = self._batch
        if link is not None:
            link.inbox(ChannelLost(detail))


def _death(exc: BaseException) -> str:
    """How a slot's worker died, from loky's error: its exit code (e.g. ``SIGSEGV(-11)``) when loky knows it."""
    match = _EXIT_CODES.search(str(exc)) if isinstance(exc, TerminatedWorkerError) else None
    if match:
        return match["codes"]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
