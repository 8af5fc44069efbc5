"""The loky backend: roles in local worker processes, and the one place loky's
failures become parroles' own.

A ``LokyBackend`` is a pool: a Manager (for cancel events), a ``WorkerChannel``
and a loky executor ("generation") of ``max_workers`` workers. It serves one
batch at a time (``attach``/``detach``); between batches ``loky_pool`` keeps it
idle, so the next batch starts on warm workers. Per batch it makes a fresh
cancel event and a payload that each worker gets once, on the channel (chunks
carry only the batch's key; see ``worker``).

When a worker dies, loky fails every unfinished future and refuses new work;
this module then finds out exactly which role died (each worker reported its
pid when the role started, and the callback that sees the breakage runs
before loky kills the other workers), reports ``Lost`` for each dispatch of
the broken generation once all its workers are gone, and starts a new
generation for whatever the executor submits next.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import threading
import traceback
import uuid
from collections.abc import Container, Sequence
from concurrent.futures import Future
from multiprocessing.connection import wait
from multiprocessing.managers import SyncManager
from typing import Any

from loky import ProcessPoolExecutor
from loky.process_executor import BrokenProcessPool, TerminatedWorkerError

from parroles import loky_pool
from parroles.backend import ChannelLost, Event, Finished, Inbox, LossCause, Lost, Started, Task
from parroles.channel import WorkerChannel
from parroles.config import ParallelRoleConfig
from parroles.lifeline import init_manager_process
from parroles.process_tree import alive, kill_descendants, kill_group
from parroles.worker import batch_payload, init_worker, run_roles

SETTLE_TIMEOUT = 10.0
_EXIT_CODES = re.compile(r"The exit codes of the workers are \{(?P<codes>[^}]*)\}")


@dataclasses.dataclass
class _Generation:
    """One loky executor and what happened to its workers."""

    number: int
    executor: ProcessPoolExecutor
    live: set[int] = dataclasses.field(default_factory=set)  # connected worker pids
    pids: set[int] = dataclasses.field(default_factory=set)  # every worker pid it had
    chunks_submitted: int = 0
    chunks_done: int = 0
    killed: set[int] = dataclasses.field(default_factory=set)  # pids we killed on purpose
    broken: BaseException | None = None
    dead: dict[int, str] = dataclasses.field(default_factory=dict)  # pid -> how it exited
    settled: bool = False
    settle_timer: threading.Timer | None = None  # in case a dead worker's channel never reports EOF


class _Relay:
    """Forwards each dispatch's messages until its end (Finished or Lost), then drops the rest.

    Start, events and outcome of a role all travel on its worker's channel
    connection, so they arrive in the order the worker sent them. Dispatches
    of another batch are not this relay's to forward.
    """

    def __init__(self, inbox: Inbox, known: Container[int]) -> None:
        self._inbox = inbox
        self._known = known
        self.ended: set[int] = set()

    def forward(self, message: Started | Event) -> None:
        if message.dispatch_id in self._known and message.dispatch_id not in self.ended:
            self._inbox(message)

    def end(self, message: Finished | Lost) -> None:
        if message.dispatch_id in self._known and message.dispatch_id not in self.ended:
            self.ended.add(message.dispatch_id)
            self._inbox(message)


@dataclasses.dataclass
class _BatchLink:
    """What the batch being served has on this pool."""

    key: str
    payload: bytes  # each worker gets it once, on the channel: the executor blob, sys.path entries, the cancel event
    event: Any  # the batch's cancel event (a Manager Event proxy)
    inbox: Inbox
    generation_of: dict[int, _Generation] = dataclasses.field(default_factory=dict)  # dispatch id -> generation
    started_on: dict[int, int] = dataclasses.field(default_factory=dict)  # dispatch id -> worker pid
    waiting: list[list[Task]] = dataclasses.field(default_factory=list)  # submitted while a generation settles
    relay: _Relay = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.relay = _Relay(self.inbox, self.generation_of)


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
        self._generations: dict[int, _Generation] = {}
        self._generation_count = 0
        self._current: _Generation | None = None
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
        """Serve a new batch: a fresh cancel event, and workers booting if there are none."""
        event = self._manager.Event()
        key = uuid.uuid4().hex
        with self._lock:
            link = self._batch = _BatchLink(key, batch_payload(executor_blob, sys_path, event), event, inbox)
            current = self._current
            if current is not None and (current.broken is not None or current.pids - current.live):
                self._retire(current)  # a worker of it died while idle
            elif current is not None:
                for pid in current.live:  # workers that join later get it with their hello
                    self._channel.send_batch(pid, link.key, link.payload)
        if self._current is None:
            self.submit([])  # spawn the workers now: they boot while the parent prepares the batch

    def detach(self) -> None:
        """The batch is over: stop what its roles started and release its cancel event."""
        with self._lock:
            link, self._batch = self._batch, None
            for number, generation in list(self._generations.items()):
                if generation is not self._current and generation.settled:
                    del self._generations[number]
            workers = set(self._current.live) if self._current is not None else set()
        kill_descendants(workers)
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
            current = self._current
            if current is not None and current.broken is not None:
                link.waiting.append(list(chunk))
                return
            if current is None:
                current = self._current = self._new_generation()
            for task in chunk:
                link.generation_of[task.dispatch_id] = current
            current.chunks_submitted += 1
        future = current.executor.submit(run_roles, link.key, [dataclasses.astuple(task) for task in chunk])
        future.add_done_callback(lambda f, g=current, c=tuple(chunk), b=link: self._on_done(g, c, b, f))

    def cancel_all(self) -> None:
        link = self._batch
        try:
            if link is not None:
                link.event.set()
        except Exception:  # noqa: BLE001 - the Manager is gone; the watcher reports it
            pass

    def cancel(self, dispatch_id: int, why: str) -> None:
        with self._lock:
            pid = self._batch.started_on.get(dispatch_id) if self._batch is not None else None
        if pid is not None:
            self._channel.send(pid, ["cancel", dispatch_id, why])

    def kill(self, dispatch_id: int) -> None:
        with self._lock:
            link = self._batch
            if link is None or dispatch_id in link.relay.ended:
                return
            generation, pid = link.generation_of.get(dispatch_id), link.started_on.get(dispatch_id)
            if generation is not None and pid is not None:
                generation.killed.add(pid)
                kill_group(pid)

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
            generations = list(self._generations.values())
        for generation in generations:
            if generation.broken is None:
                busy = generation.chunks_done < generation.chunks_submitted
                generation.executor.shutdown(wait=not busy, kill_workers=busy)
            for pid in generation.pids:
                kill_group(pid)  # whatever the roles started
        os.write(self._stop_watch_w, b"x")
        self._watcher.join()
        os.close(self._stop_watch_r)
        os.close(self._stop_watch_w)
        self._channel.close()
        try:
            self._manager.shutdown()
        except Exception:  # noqa: BLE001 - already dead: nothing left to stop
            pass

    # -- internals -------------------------------------------------------------------------

    def _new_generation(self) -> _Generation:
        self._generation_count += 1
        number = self._generation_count
        initargs = (number, self._channel.address, self._channel.authkey, os.getpid())
        executor = ProcessPoolExecutor(max_workers=self.max_workers, initializer=init_worker, initargs=initargs)
        generation = self._generations[number] = _Generation(number, executor)
        return generation

    def _retire(self, generation: _Generation) -> None:
        """Give up a generation that lost a worker while no batch used it."""
        generation.settled = True
        if generation.broken is None:
            generation.executor.shutdown(wait=False, kill_workers=True)
        for pid in generation.pids:
            kill_group(pid)
        self._current = None

    def _on_message(self, pid: int, message: list[Any]) -> None:
        kind = message[0]
        with self._lock:
            link = self._batch
            if kind == "hello":
                generation = self._generations.get(int(message[3]))
                if generation is not None and not generation.settled:
                    generation.live.add(pid)
                    generation.pids.add(pid)
                    self._host_of[pid] = message[2]
                    if link is not None:
                        self._channel.send_batch(pid, link.key, link.payload)
            elif link is None:
                return  # a late message of a batch that is over
            elif kind == "start":
                _, dispatch_id, worker_pid, started_at = message
                generation = link.generation_of.get(dispatch_id)
                if generation is not None and pid in generation.pids:
                    link.started_on[dispatch_id] = worker_pid
                    link.relay.forward(Started(dispatch_id, worker_pid, self._host_of[pid], started_at))
            elif kind == "event":
                _, dispatch_id, event_kind, payload_json, ts = message
                link.relay.forward(Event(dispatch_id, event_kind, payload_json, ts))
            elif kind == "end":
                link.relay.end(Finished(message[1], message[2]))

    def _on_gone(self, pid: int) -> None:
        with self._lock:
            for generation in list(self._generations.values()):
                if pid in generation.live:
                    generation.live.discard(pid)
                    self._maybe_settle(generation)

    def _on_done(self, generation: _Generation, chunk: tuple[Task, ...], link: _BatchLink,
                 future: Future[int]) -> None:
        exc = future.exception()
        with self._lock:
            generation.chunks_done += 1
            if exc is None:
                return  # each role of the chunk reported its own end on the channel
            if not isinstance(exc, BrokenProcessPool):
                # parroles' own worker code failed: the roles it did not finish cannot be trusted to run again.
                for task in chunk:
                    link.relay.end(Finished(task.dispatch_id, _internal_failure(exc)))
                return
            if generation.broken is None:
                generation.broken = exc
                # This callback runs before loky kills the surviving workers:
                # the workers dead now are the ones that broke the pool.
                generation.dead = _dead_workers(generation.pids, exc)
                generation.settle_timer = threading.Timer(SETTLE_TIMEOUT, self._force_settle, (generation,))
                generation.settle_timer.daemon = True
                generation.settle_timer.start()
            self._maybe_settle(generation)

    def _force_settle(self, generation: _Generation) -> None:
        with self._lock:
            generation.live.clear()
            self._maybe_settle(generation)

    def _maybe_settle(self, generation: _Generation) -> None:
        """Once a broken generation has no worker left, report the dispatches it lost."""
        if generation.broken is None or generation.live or generation.settled:
            return
        if generation.chunks_done < generation.chunks_submitted:
            return  # loky has not failed every future yet
        generation.settled = True
        if generation.settle_timer is not None:
            generation.settle_timer.cancel()
        for pid in generation.pids:
            kill_group(pid)
        if self._current is generation:
            self._current = None
        link = self._batch
        if link is None:
            return
        lost = [d for d, g in link.generation_of.items() if g is generation and d not in link.relay.ended]
        any_started = any(link.generation_of.get(d) is generation for d in link.started_on)
        losses = [self._loss(generation, link, dispatch_id, any_started) for dispatch_id in lost]
        # The culprits first, so their failure (and any fail-fast it causes) is
        # known before the bystanders are requeued.
        for loss in sorted(losses, key=lambda loss: loss.cause is LossCause.COLLATERAL):
            link.relay.end(loss)
        waiting, link.waiting = link.waiting, []
        if not self._closing:
            for chunk in waiting:
                self.submit(chunk)

    def _loss(self, generation: _Generation, link: _BatchLink, dispatch_id: int, any_started: bool) -> Lost:
        pid = link.started_on.get(dispatch_id)
        if pid is not None and pid in generation.killed:
            return Lost(dispatch_id, LossCause.KILLED, f"worker process (pid {pid}) was killed", True)
        if pid is not None and pid in generation.dead:
            detail = f"worker process (pid {pid}) died: {generation.dead[pid]}"
            return Lost(dispatch_id, LossCause.CRASH, detail, True)
        if not any_started and not generation.dead and not generation.killed:
            # Nothing ever ran here and no worker is to blame: the pool itself is unusable.
            return Lost(dispatch_id, LossCause.CRASH, f"worker pool failed: {_first_line(generation.broken)}", False)
        why = f"lost when the worker pool broke: {_first_line(generation.broken)}"
        return Lost(dispatch_id, LossCause.COLLATERAL, why, pid is not None)

    def _watch_manager(self) -> None:
        process = self._manager._process  # type: ignore[attr-defined]
        ready = wait([process.sentinel, self._stop_watch_r])
        if process.sentinel in ready and self._stop_watch_r not in ready:
            with self._lock:
                link = self._batch
            if link is not None:
                link.inbox(ChannelLost(f"the cancel channel was lost (Manager process exited: {process.exitcode})"))


def _internal_failure(exc: BaseException) -> dict[str, Any]:
    """An outcome for an exception raised by parroles' own worker code (the role did not run to its end)."""
    error = {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
             "traceback": "".join(traceback.format_exception(exc))}
    return {"status": "failed", "error": error, "events": 0}


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dead_workers(pids: set[int], exc: BaseException) -> dict[int, str]:
    """Pids of this generation that are no longer running, with loky's exit codes."""
    dead = [pid for pid in pids if not alive(pid)]
    match = _EXIT_CODES.search(str(exc)) if isinstance(exc, TerminatedWorkerError) else None
    codes = match["codes"] if match else _first_line(exc)
    return {pid: codes for pid in dead}
