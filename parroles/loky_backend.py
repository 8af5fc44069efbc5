"""The loky backend: roles in local worker processes, and the one place loky's failures become parroles' own.

A ``LokyBackend`` is a pool: a Manager (for cancel events), a ``WorkerChannel``
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
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import multiprocessing
import os
import re
import threading
import traceback
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from multiprocessing.connection import wait
from multiprocessing.managers import SyncManager
from typing import Any

from loky.process_executor import BrokenProcessPool, ShutdownExecutorError, TerminatedWorkerError

from parroles import loky_pool
from parroles.backend import ChannelLost, Event, Finished, Inbox, LossCause, Lost, Started, Task
from parroles.channel import WorkerChannel
from parroles.config import ParallelRoleConfig
from parroles.lifeline import init_manager_process
from parroles.loky_slot import BOOT, Chunk, Slot, SlotState
from parroles.process_tree import kill_descendants
from parroles.worker import batch_payload

SETTLE_TIMEOUT = 3.0  # longest a dead worker's slot waits for the end of its channel (an escaped child may hold it)
MAX_REQUEUES = 3  # times a role may be handed back unstarted by dying slots before it is failed
_EXIT_CODES = re.compile(r"The exit codes of the workers are \{(?P<codes>[^}]*)\}")


@dataclasses.dataclass
class _BatchLink:
    """What the batch being served has on this pool."""

    key: str
    payload: bytes  # each worker gets it once, on the channel: the executor blob, sys.path entries, the cancel event
    event: Any  # the batch's cancel event (a Manager Event proxy)
    inbox: Inbox
    queue: collections.deque[Chunk] = dataclasses.field(default_factory=collections.deque)  # not on a slot yet
    handed: dict[int, tuple[Slot, Task]] = dataclasses.field(default_factory=dict)  # unended, on a slot
    started_on: dict[int, int] = dataclasses.field(default_factory=dict)  # dispatch id -> worker pid
    ended: set[int] = dataclasses.field(default_factory=set)
    requeued: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    cancelled: bool = False  # cancel_all was called: nothing more starts

    def forward(self, slot: Slot, message: Started | Event | Finished) -> None:
        """A message from ``slot``'s worker about a dispatch it was handed (a stale slot's are dropped)."""
        if self.slot_of(message.dispatch_id) is slot:
            if isinstance(message, Finished):
                self.end(message)
            elif message.dispatch_id not in self.ended:
                self.inbox(message)

    def end(self, message: Finished | Lost) -> None:
        """Report a dispatch's end, once."""
        if message.dispatch_id not in self.ended:
            self.ended.add(message.dispatch_id)
            self.handed.pop(message.dispatch_id, None)
            self.inbox(message)

    def slot_of(self, dispatch_id: int) -> Slot | None:
        held = self.handed.get(dispatch_id)
        return held[0] if held is not None else None


class LokyBackend:
    """A pool of local loky workers serving one batch at a time; see the module docstring."""

    name = "loky"
    lookahead = 8
    max_chunk = 64

    @classmethod
    def open(cls, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
             config: ParallelRoleConfig) -> LokyBackend:
        pool = loky_pool.take(max_workers, config.max_concurrent)
        if pool is not None:
            try:
                pool.attach(executor_blob, sys_path, inbox)
            except Exception:  # noqa: BLE001 - it broke while idle (its Manager died): start afresh
                pool.shutdown()
                pool = None
        if pool is None:
            pool = cls(max_workers)
            pool.attach(executor_blob, sys_path, inbox)
        pool._idle_timeout = config.idle_worker_timeout
        return pool

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max_workers
        self._idle_timeout = 0.0
        self._lock = threading.RLock()
        self._positions: list[Slot | None] = [None] * max_workers  # the slots that take work
        self._slots: dict[int, Slot] = {}  # serial -> slot, serving or dying
        self._by_pid: dict[int, Slot] = {}
        self._serials = itertools.count(1)
        self._closing = False
        self._batch: _BatchLink | None = None
        self._host_of: dict[int, str] = {}
        # Fork the Manager before this pool starts any thread of its own.
        self._manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        self._manager.start(init_manager_process, (os.getpid(),))
        self._channel = WorkerChannel(self._on_message, self._on_gone)
        self._stop_watch_r, self._stop_watch_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch_manager, name="parroles-manager-watch", daemon=True)
        self._watcher.start()

    # -- a batch's use of the pool --------------------------------------------------------

    def attach(self, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox) -> None:
        """Serve a new batch: a fresh cancel event, and a worker booting in each empty slot."""
        event = self._manager.Event()
        key = uuid.uuid4().hex
        with self._lock:
            link = self._batch = _BatchLink(key, batch_payload(executor_blob, sys_path, event), event, inbox)
            for i, slot in enumerate(self._positions):
                if slot is None:
                    self._positions[i] = self._new_slot()  # it boots while the parent prepares the batch
                elif slot.state is SlotState.READY and slot.pid is not None:
                    self._channel.send_batch(slot.pid, link.key, link.payload)
                # a BOOTING worker gets the payload with its hello

    def detach(self) -> None:
        """The batch is over: stop what its roles started and release its cancel event."""
        with self._lock:
            link, self._batch = self._batch, None
            workers = {slot.pid for slot in self._positions
                       if slot is not None and slot.state is SlotState.READY and slot.pid is not None}
        kill_descendants(workers)
        for pid in workers:
            self._channel.send(pid, ["sweep"])  # the worker reaps them (and kills any the parent missed)
        if link is not None:
            try:
                link.event.set()  # lets each worker's waiter thread for this batch return
            except Exception:  # noqa: BLE001 - the Manager is gone; nothing is waiting then
                pass

    def healthy(self) -> bool:
        process = self._manager._process  # type: ignore[attr-defined]
        return not self._closing and process.is_alive()

    # -- the Backend interface -----------------------------------------------------------

    def submit(self, chunk: Sequence[Task]) -> None:
        with self._lock:
            link = self._batch
            assert link is not None, "submit outside a batch"
            link.queue.append(tuple(chunk))
            self._fill(link)

    def cancel_all(self) -> None:
        link = self._batch
        if link is None:
            return
        try:
            link.event.set()
        except Exception:  # noqa: BLE001 - the Manager is gone; the watcher reports it
            pass
        with self._lock:
            link.cancelled = True
            while link.queue:  # never reached a worker: they end now
                for task in link.queue.popleft():
                    link.end(_not_started(task, "the batch is being cancelled"))

    def cancel(self, dispatch_id: int, why: str) -> None:
        with self._lock:
            pid = self._batch.started_on.get(dispatch_id) if self._batch is not None else None
        if pid is not None:
            self._channel.send(pid, ["cancel", dispatch_id, why])

    def kill(self, dispatch_id: int) -> None:
        with self._lock:
            link = self._batch
            if link is None or dispatch_id in link.ended:
                return
            slot, pid = link.slot_of(dispatch_id), link.started_on.get(dispatch_id)
            if slot is None or pid is None or slot.pid != pid or slot.state is not SlotState.READY:
                return
            slot.killed_for = dispatch_id
        slot.kill()  # loky sees the worker die and fails this slot's calls: _on_done reports it

    def close(self, reuse: bool) -> None:
        self.detach()
        if reuse and self._idle_timeout > 0 and self.healthy():
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
                thread.join(timeout=SETTLE_TIMEOUT)
        for slot in slots:
            slot.kill_group()
        os.write(self._stop_watch_w, b"x")
        self._watcher.join()
        os.close(self._stop_watch_r)
        os.close(self._stop_watch_w)
        self._channel.close()
        try:
            self._manager.shutdown()
        except Exception:  # noqa: BLE001 - already dead: nothing left to stop
            pass

    # -- placing chunks on slots -------------------------------------------------------------

    def _new_slot(self) -> Slot:
        serial = next(self._serials)
        slot = Slot.start(serial, self._channel.address, self._channel.authkey, os.getpid(), self._on_boot)
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

    def _fill(self, link: _BatchLink) -> None:
        """Hand queued chunks to free slots (the lock is held)."""
        while link.queue and not link.cancelled and not self._closing:
            slot = self._free_slot()
            if slot is None:
                return
            chunk = link.queue.popleft()
            for task in chunk:
                link.handed[task.dispatch_id] = (slot, task)
            try:
                future = slot.submit(link.key, chunk)
            except BrokenProcessPool as exc:  # its worker died while idle, and loky knows first
                link.queue.appendleft(chunk)
                self._slot_died(slot, _death(exc))
                continue
            except (ShutdownExecutorError, RuntimeError) as exc:  # the interpreter is exiting
                for task in chunk:
                    link.end(Finished(task.dispatch_id, _internal_failure(exc)))
                continue
            future.add_done_callback(lambda f, s=slot, c=chunk, b=link: self._on_done(s, c, b, f))

    # -- what workers and loky report --------------------------------------------------------

    def _on_message(self, pid: int, message: list[Any]) -> None:
        kind = message[0]
        with self._lock:
            link = self._batch
            if kind == "hello":
                slot = self._slots.get(int(message[3]))
                if slot is not None and slot.state is SlotState.BOOTING:
                    slot.pid, slot.state = pid, SlotState.READY
                    self._by_pid[pid] = slot
                    self._host_of[pid] = message[2]
                    if link is not None:
                        self._channel.send_batch(pid, link.key, link.payload)
                return
            slot = self._by_pid.get(pid)
            if link is None or slot is None:
                return  # a late message of a batch that is over
            if kind == "start":
                _, dispatch_id, worker_pid, started_at = message
                if link.slot_of(dispatch_id) is slot:
                    link.started_on[dispatch_id] = worker_pid
                link.forward(slot, Started(dispatch_id, worker_pid, self._host_of[pid], started_at))
            elif kind == "event":
                _, dispatch_id, event_kind, payload_json, ts = message
                link.forward(slot, Event(dispatch_id, event_kind, payload_json, ts))
            elif kind == "end":
                link.forward(slot, Finished(message[1], message[2]))

    def _on_gone(self, pid: int) -> None:
        with self._lock:
            slot = self._by_pid.get(pid)
            if slot is not None:
                self._slot_died(slot, "")

    def _on_boot(self, slot: Slot, future: Future[Any]) -> None:
        self._on_done(slot, BOOT, None, future)

    def _on_done(self, slot: Slot, chunk: Chunk, link: _BatchLink | None, future: Future[Any]) -> None:
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
                    link.end(Finished(task.dispatch_id, _internal_failure(exc)))
            self._settle_if_ready(slot)
            if self._batch is not None:
                self._fill(self._batch)

    # -- a slot whose worker died ------------------------------------------------------------

    def _slot_died(self, slot: Slot, death: str) -> None:
        """Its worker is gone (loky or the channel said so first): take it out of service (the lock is held)."""
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
            lost: list[int] = []
            unstarted: list[Task] = []
            for dispatch_id, (holder, task) in list(link.handed.items()):
                if holder is slot:
                    if slot.pid is not None and link.started_on.get(dispatch_id) == slot.pid:
                        lost.append(dispatch_id)
                    else:
                        unstarted.append(task)
            # The roles that died first, so their failure (and any fail-fast it causes) is known first.
            for dispatch_id in lost:
                link.end(self._loss(slot, dispatch_id))
            self._requeue(slot, link, unstarted)
            self._fill(link)

    def _loss(self, slot: Slot, dispatch_id: int) -> Lost:
        if slot.killed_for == dispatch_id:
            return Lost(dispatch_id, LossCause.KILLED, f"worker process (pid {slot.pid}) was killed", True)
        if slot.killed_for is not None:  # it started just as the role before it was being killed
            why = f"worker process (pid {slot.pid}) was killed while it stopped another role"
            return Lost(dispatch_id, LossCause.CRASH, why, True)
        return Lost(dispatch_id, LossCause.CRASH, f"worker process (pid {slot.pid}) died: {slot.death}", True)

    def _requeue(self, slot: Slot, link: _BatchLink, unstarted: list[Task]) -> None:
        """Roles handed to a slot that died before they started: first in line for the next free slot."""
        again: list[Task] = []
        for task in unstarted:
            link.requeued[task.dispatch_id] += 1
            if link.cancelled:
                link.end(_not_started(task, "the batch is being cancelled"))
            elif link.requeued[task.dispatch_id] > MAX_REQUEUES:
                why = f"worker process (pid {slot.pid}) died before the role started: {slot.death or 'no exit code'}"
                link.end(Lost(task.dispatch_id, LossCause.CRASH, why, False))
            else:
                link.handed.pop(task.dispatch_id)
                again.append(task)
        for start in reversed(range(0, len(again), self.max_chunk)):
            link.queue.appendleft(tuple(again[start:start + self.max_chunk]))

    def _watch_manager(self) -> None:
        process = self._manager._process  # type: ignore[attr-defined]
        ready = wait([process.sentinel, self._stop_watch_r])
        if process.sentinel in ready and self._stop_watch_r not in ready:
            with self._lock:
                link = self._batch
            if link is not None:
                link.inbox(ChannelLost(f"the cancel channel was lost (Manager process exited: {process.exitcode})"))


def _not_started(task: Task, why: str) -> Finished:
    return Finished(task.dispatch_id, {"status": "not_started", "message": why})


def _internal_failure(exc: BaseException) -> dict[str, Any]:
    """An outcome for an exception raised by parroles' own worker code (the role did not run to its end)."""
    error = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
             "traceback": "".join(traceback.format_exception(exc))}
    return {"status": "failed", "error": error, "events": 0}


def _death(exc: BaseException) -> str:
    """How a slot's worker died, from loky's error: its exit code (e.g. ``SIGSEGV(-11)``) when loky knows it."""
    match = _EXIT_CODES.search(str(exc)) if isinstance(exc, TerminatedWorkerError) else None
    if match:
        return match["codes"]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
