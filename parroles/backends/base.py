"""What the loop needs from an execution backend; the backends are listed in ``parroles.backends``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from parroles.backends import BackendOptions
from parroles.backends.protocol import Inbox, Task


class Backend(Protocol):
    """Runs tasks somewhere and reports on them through ``inbox``; one batch at a time."""

    name: str
    lookahead: int  # chunks it may be handed beyond one per worker, so no worker idles
    max_chunk: int  # roles per chunk it accepts

    def submit(self, chunk: Sequence[Task]) -> None:
        """Run the tasks of ``chunk`` one after another on one worker, as soon as one is free."""

    def stop_all(self) -> None:
        """Tell every worker that the batch is stopping (fail-fast, a signal, a lost channel)."""

    def stop(self, dispatch_id: int, why: str) -> None:
        """Tell the worker running ``dispatch_id`` that its role is to stop, and why (its own timeout)."""

    def kill(self, dispatch_id: int) -> None:
        """Stop the worker running ``dispatch_id`` now; a ``Lost(KILLED)`` follows."""

    @classmethod
    def open(cls, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
             options: BackendOptions) -> Backend:
        """A backend ready for one batch (it may reuse workers an earlier batch left idle)."""

    @classmethod
    def start_workers(cls, max_workers: int, options: BackendOptions) -> None:
        """Start workers ahead of this process's next batch, which takes them if it has ``max_workers``
        (a no-op for a backend whose workers are not this process's to start)."""

    def close(self, ended_cleanly: bool) -> None:
        """End the batch: stop everything its roles started. What else it stops is the backend's to
        decide: loky keeps the workers of a batch that ended cleanly idle for the next one."""
