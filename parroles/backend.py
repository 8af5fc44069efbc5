"""What the executor needs from an execution backend, and what backends report back.

The executor is written against ``Backend`` alone; ``loky_backend`` runs roles
in local worker processes. A backend reports, through the executor's inbox,
in this order per dispatch: ``Started``, any ``Event``s, then exactly one of
``Finished`` or ``Lost``. ``ChannelLost`` says the cancel channel itself died.
A backend never reports a role lost because another role's worker died: a
role it handed out that never started is its to run elsewhere.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class Task:
    """One dispatch of one role: what a worker needs, all plain values."""

    dispatch_id: int
    role: str
    run_id: str
    parent_run_id: str
    attempt: int
    fail_fast: bool
    max_output_bytes: int


@dataclasses.dataclass(frozen=True)
class Started:
    dispatch_id: int
    pid: int
    host: str
    started_at: float


@dataclasses.dataclass(frozen=True)
class Event:
    dispatch_id: int
    kind: str
    payload_json: str
    ts: float


@dataclasses.dataclass(frozen=True)
class Finished:
    dispatch_id: int
    outcome: dict[str, Any]


class LossCause(str, enum.Enum):
    CRASH = "crash"  # the role's own worker died
    KILLED = "killed"  # the executor asked for its worker to be killed


@dataclasses.dataclass(frozen=True)
class Lost:
    dispatch_id: int
    cause: LossCause
    detail: str
    started: bool


@dataclasses.dataclass(frozen=True)
class ChannelLost:
    detail: str


Message = Started | Event | Finished | Lost | ChannelLost
Inbox = Callable[[Message], None]


class Backend(Protocol):
    """Runs tasks somewhere and reports on them through ``inbox``; one batch at a time."""

    name: str
    lookahead: int  # chunks it may be handed beyond one per worker, so no worker idles
    max_chunk: int  # roles per chunk it accepts

    def submit(self, chunk: Sequence[Task]) -> None:
        """Run the tasks of ``chunk`` one after another on one worker, as soon as one is free."""

    def cancel_all(self) -> None:
        """Signal every worker that the batch is stopping (the fail-fast event)."""

    def cancel(self, dispatch_id: int, why: str) -> None:
        """Tell the worker running ``dispatch_id`` that its role should stop."""

    def kill(self, dispatch_id: int) -> None:
        """Stop the worker running ``dispatch_id`` now; a ``Lost(KILLED)`` follows."""

    @classmethod
    def open(cls, max_workers: int, executor_blob: bytes, sys_path: Sequence[str], inbox: Inbox,
             config: Any) -> Backend:
        """A backend ready for one batch (it may reuse workers an earlier batch left idle)."""

    def close(self, reuse: bool) -> None:
        """End the batch: stop everything its roles started; stop the workers too, unless
        ``reuse`` (the batch ended cleanly) and the backend keeps idle workers for the next batch."""
