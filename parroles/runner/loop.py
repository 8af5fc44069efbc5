"""The parent's one loop over a batch's inbox (see ``execute`` for who runs where).

Everything that happens to a batch arrives here as a message, in one queue:
what the backend reports (``Started``, ``Event``, ``Finished``, ``Lost``,
``ChannelLost``) and the signals that reach the parent (``Interrupt``). The
loop hands each to the batch's book (``Batch``), which decides every run's
status; then it dispatches what may start, and tells the backend to stop or
kill what the book says is due.
"""

from __future__ import annotations

import itertools
import queue
import signal
import time
from collections.abc import Callable

from parroles import signals
from parroles.backends.base import Backend
from parroles.backends.protocol import ChannelLost, Event, Finished, Logs, Lost, Message, Started
from parroles.errors import BatchInterrupted
from parroles.results import Reason, RoleRunResult
from parroles.runner.batch import Batch
from parroles.runner.commands import Command, ForgetMemory, StopAll, StopRun, WatchMemory
from parroles.runner.memory import MemoryExceeded, MemoryWatch
from parroles.runner.tracked import Interrupt

# What the loop reads: backends report into it (through a ``protocol.Inbox``), the signal handler too.
MessageQueue = queue.SimpleQueue[Message | Interrupt | MemoryExceeded]
BURST = 64  # messages handled at most before the next dispatch (short roles end faster than one is handled)


class Loop:
    def __init__(self, batch: Batch, open_backend: Callable[[], Backend], inbox: MessageQueue,
                 deferral: signals.Deferral, backend_class: type[Backend],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.batch = batch
        self.open_backend = open_backend  # called once a role is to be handed to a worker
        self.backend: Backend | None = None
        self.backend_class = backend_class  # its chunking, known before it is opened
        self.inbox = inbox
        self.deferral = deferral
        self.clock = clock  # the one clock every deadline of the batch is on
        self.memory = MemoryWatch(inbox.put)  # started at its first watch (a role with a memory_limit)
        self.journaled = 0  # records the ledger file could not take in time (durable in the journal)

    def run(self) -> list[RoleRunResult]:
        batch = self.batch
        # SIGINT and SIGTERM become inbox messages: a handler that raised could leave a run half-handled.
        with self.deferral.listening(lambda signum: self.inbox.put(Interrupt.of(signum))):
            try:
                if batch.unfinished:
                    self._handle_waiting()  # a signal that came while the batch was recorded: before any start
                    self._dispatch()
                while batch.unfinished:
                    self._handle(self._next_message())
                    self._handle_waiting(BURST)  # what came meanwhile: one dispatch for all of it
                    self._dispatch()
            except BaseException as exc:
                self.memory.close()
                batch.abandon(exc)  # leave no run QUEUED or RUNNING behind a failure of our own
                try:
                    batch.close(batch.config.ledger_wait)
                except Exception as cleanup:  # noqa: BLE001 - the loop's own error is the one to raise
                    note(exc, cleanup, "and the ledger could not record the batch's end")
                raise
        # The backend is closed by the caller, after this.
        self.memory.close()
        self.journaled = self._close_batch()
        if batch.interrupt is not None:
            if batch.interrupt.signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise BatchInterrupted(batch.interrupt.name, 128 + batch.interrupt.signum)
        return batch.results()

    def _close_batch(self) -> int:
        """Record the batch's end and wait for the last commit; a signal meanwhile stops the wait."""
        try:
            with self.deferral.interruptible():
                return self.batch.close(self.batch.config.ledger_wait)
        except (KeyboardInterrupt, BatchInterrupted):
            self.batch.writer.flush(0)  # what is not committed is in the journal now (or this raises)
            raise

    def _handle_waiting(self, at_most: int | None = None) -> None:
        for _ in itertools.repeat(None) if at_most is None else range(at_most):
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _next_message(self) -> Message | Interrupt | MemoryExceeded | None:
        timeout = self.batch.seconds_to_next_deadline(self.clock())
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None  # a deadline is due

    def _dispatch(self) -> None:
        kind = self.backend_class
        for chunk in self.batch.chunks_to_dispatch(kind.lookahead, kind.max_chunk, self.clock()):
            if self.backend is None:
                self.backend = self.open_backend()
            self.backend.submit(chunk)

    def _handle(self, message: Message | Interrupt | MemoryExceeded | None) -> None:
        batch, now = self.batch, self.clock()
        commands: list[Command] = []
        if isinstance(message, Started):
            commands = batch.started(message, now)
        elif isinstance(message, Event):
            batch.event(message)
        elif isinstance(message, Logs):
            batch.logs(message)
        elif isinstance(message, Finished):
            commands = batch.finished(message, now)
        elif isinstance(message, Lost):
            commands = batch.lost(message, now)
        elif isinstance(message, ChannelLost):
            commands = batch.cancel(Reason.CHANNEL_LOST, now, detail=message.detail)
        elif isinstance(message, Interrupt):
            commands = batch.interrupted(message, now)
        elif isinstance(message, MemoryExceeded):
            commands = batch.memory_exceeded(message, now)
        for command in [*commands, *batch.due(now)]:
            self._act(command)

    def _act(self, command: Command) -> None:
        """The only place a batch's decisions reach its backend (one that has none has nothing to stop)."""
        if isinstance(command, WatchMemory):
            self.memory.watch(command.dispatch_id, command.pid, command.limit)
        elif isinstance(command, ForgetMemory):
            self.memory.forget(command.dispatch_id)
        elif self.backend is None:
            return
        elif isinstance(command, StopAll):
            self.backend.stop_all()
        elif isinstance(command, StopRun):
            self.backend.stop(command.dispatch_id, command.why)
        else:
            self.backend.kill(command.dispatch_id)


def note(exc: BaseException, cleanup: Exception, what: str) -> None:
    """Keep a cleanup's error beside the one on its way, unless it only says the same again."""
    if str(cleanup) != str(exc):
        exc.add_note(f"{what}: {cleanup}")
