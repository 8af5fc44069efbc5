"""SIGINT and SIGTERM, deferred: recorded when they arrive, acted on at safe points.

A handler that raises can unwind the main thread while the ledger writer's
thread is inside DuckDB's native code (the process then dies in C++, or
leaves a file without a schema), or leave a run half-handled. So while
parroles runs a batch, and in ``parroles run`` from the process's start,
the two signals only record themselves and wake whoever listens: the
batch's loop turns them into a cancellation. A signal that no loop took is
raised once the deferral ends (``KeyboardInterrupt`` for SIGINT,
``BatchInterrupted`` for SIGTERM), unless another exception is already on
its way. Only the main thread can install handlers; elsewhere signals keep
theirs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from parroles.errors import BatchInterrupted

Listener = Callable[[int], None]
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Deferral:
    """Signals received while deferred; a listener (the batch's loop) takes them as they come."""

    def __init__(self) -> None:
        self._undelivered: list[int] = []
        self._listener: Listener | None = None
        self._raise_now = False  # in an interruptible wait: the signal is raised at once
        self._previous: dict[int, Any] = {}  # the handlers to put back

    def stop(self) -> None:
        """End the deferral now: the previous handlers again, and a signal that came meanwhile raised."""
        self._restore()
        self.raise_pending()

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: appends and SimpleQueue.put are safe here.
        if self._raise_now:
            self._raise_now = False  # once: the cleanup on the way out is not interrupted again
            raise interruption(signum)
        if self._listener is not None:
            self._listener(signum)
        else:
            self._undelivered.append(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait the signals may cut short: raised at once, in this thread, as ``interruption`` says.

        Only for the main thread waiting on another thread's work (the ledger
        writer's open, its last commit): no native call is under way in it.
        """
        self.raise_pending()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False

    @contextlib.contextmanager
    def listening(self, listener: Listener) -> Iterator[None]:
        """Hand ``listener`` every signal that arrives meanwhile, and those that came before."""
        waiting, self._undelivered = self._undelivered, []
        for signum in waiting:
            listener(signum)
        self._listener = listener
        try:
            yield
        finally:
            self._listener = None

    def raise_pending(self) -> None:
        """Raise the first signal no listener took, as the exception it stands for."""
        if self._undelivered:
            signum = self._undelivered[0]
            self._undelivered = []
            raise interruption(signum)


def interruption(signum: int) -> BaseException:
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return BatchInterrupted(signal.Signals(signum).name, 128 + signum)


_active: Deferral | None = None


def stop_deferring() -> None:
    """End the deferral in force, if any (see ``Deferral.stop``)."""
    global _active
    deferral, _active = _active, None
    if deferral is not None:
        deferral.stop()


@contextlib.contextmanager
def deferred() -> Iterator[Deferral]:
    """Defer SIGINT and SIGTERM for the duration; nested uses share the outermost deferral."""
    global _active
    if _active is not None:
        yield _active
        return
    deferral = Deferral()
    if threading.current_thread() is not threading.main_thread():
        yield deferral  # signals reach the main thread only: nothing to defer here
        return
    for signum in SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue  # the process chose to ignore it (e.g. started in the background by a shell)
        deferral._previous[signum] = signal.signal(signum, deferral._handle)
    _active = deferral
    try:
        yield deferral
    except BaseException:
        raise  # the exception already on its way wins over a pending signal
    else:
        deferral.raise_pending()
    finally:
        _active = None
        deferral._restore()
