"""The messages between the parent's loop, a backend and its workers: a frozen ``msgspec.Struct`` each.

Used on both sides of the process boundary (worker-side code imports it; it
imports neither duckdb nor the ledger). Per dispatch a backend reports to
the loop's inbox, in this order: ``Started``, any ``Event``s, then exactly
one of ``Finished`` (the worker's ``Outcome``) or ``Lost`` (the worker died or
was killed). ``ChannelLost`` says the cancel channel itself died. A backend
never reports a role lost because another role's worker died: a role it
handed out that never started is its to run elsewhere.

A message that crosses a process boundary as bytes goes through ``to_wire``
and ``from_wire`` (msgspec): a JSON object tagged with the message's class
(``{"type": "Started", ...}``), never a pickle and never a positional list;
fields at their defaults are left out. A backend's own messages (loky's
channel: ``Hello``, ``Cancel``, ``Sweep``) live with that backend, which adds
them to ``WIRE``.

Structs, not dataclasses: every process that runs roles imports these (the
parent, the fork server, each loky worker), and a frozen dataclass costs
~0.8 ms to define on Python 3.11 where a Struct costs ~0.02 ms.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, Union

import msgspec

from parroles.results import Cost, ErrorInfo, FailedNeed, Reason, RetryPolicy


class Handoff(msgspec.Struct, frozen=True, omit_defaults=True):
    """A needed role's output, handed to the role that needs it (as JSON, never a pickle)."""

    from_role: str
    token_id: str
    output_json: str
    output_digest: str
    output_kind: str | None = None  # the typed output it is, as its role returned it


class Task(msgspec.Struct, frozen=True, omit_defaults=True):
    """One dispatch of one role: what a worker needs, all plain values."""

    dispatch_id: int
    role: str
    run_id: str
    parent_run_id: str
    attempt: int
    fail_fast: bool
    max_output_bytes: int
    inputs: tuple[Handoff, ...] = ()  # the outputs of the roles it needs
    capture_output: bool = True  # its stdout and stderr go to its run's logs
    max_log_bytes: int = 8 * 1024 * 1024
    failed_needs: tuple[tuple[str, FailedNeed], ...] = ()  # needs that ended without completing, by name
    retry: RetryPolicy | None = None  # its role's retry policy while it has attempts left
    threads: int | None = None  # its own thread cap (``backends.threads``); None: its worker's


class OutcomeStatus(str, enum.Enum):
    """How a role's call ended, as its worker saw it (the loop decides the run's status from it)."""

    NOT_STARTED = "not_started"  # the batch was being cancelled when its turn came
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # it let RoleCancelled propagate


class Outcome(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a worker reports at a role's end. Built in the worker, read by the loop's ``Batch``."""

    status: OutcomeStatus
    output_json: str | None = None  # a COMPLETED role's output, as JSON text
    output_kind: str | None = None  # the typed output's kind, when the role returned one
    error: ErrorInfo | None = None
    reason: Reason | None = None  # set when the worker knows better than "error" (OUTPUT)
    stop_reason: str | None = None  # why it was told to stop, if it was
    finished_at: float | None = None
    duration_ms: float | None = None
    # What its retry policy is decided on, for a FAILED role: its exception's class and bases (qualified and
    # plain names), a command's exit code, and Retry(after=...) (-1.0: asked, with no delay of its own).
    error_types: tuple[str, ...] = ()
    exit_code: int | None = None
    retry_after: float | None = None
    cost: Cost | None = None  # what the call cost (``backends.usage``)

    @classmethod
    def failed(cls, exc: BaseException, **fields: Any) -> Outcome:
        return cls(OutcomeStatus.FAILED, error=ErrorInfo.from_exception(exc), **fields)


class Started(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    dispatch_id: int
    pid: int
    host: str  # the worker's host (a Dask worker's address)
    started_at: float
    threads: int | None = None  # the thread cap it runs under (None: none that parroles set)


class Event(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    dispatch_id: int
    kind: str
    payload_json: str
    ts: float


class Logs(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    """Lines a role wrote to its stdout or stderr, in order: (seq, stream, line, ts) each."""

    dispatch_id: int
    lines: list[tuple[int, str, str, float]]


class Finished(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    dispatch_id: int
    outcome: Outcome


class LossCause(str, enum.Enum):
    CRASH = "crash"  # the role's own worker died
    KILLED = "killed"  # the executor asked for its worker to be killed


class Lost(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    dispatch_id: int
    cause: LossCause
    detail: str


class ChannelLost(msgspec.Struct, frozen=True, omit_defaults=True):
    detail: str


Message = Started | Event | Logs | Finished | Lost | ChannelLost
Inbox = Callable[[Message], None]


# -- as bytes: what crosses a process boundary that is not a pickle ------------------------

# Lost travels as bytes too: a Dask worker that finds its dispatch begun by a worker that died reports it.
WireMessage = Started | Event | Logs | Finished | Lost
WIRE: tuple[type[Any], ...] = (Started, Event, Logs, Finished, Lost)


_ENCODER = msgspec.json.Encoder()


def to_wire(message: msgspec.Struct) -> bytes:
    """A message as a JSON object whose first member, ``type``, names its class (msgspec's tag).

    msgspec writes and reads the Structs in C (0.2-0.8 us a message, where the
    standard library took 5 to 11). Its JSON never holds a raw newline (``loky.channel`` splits
    frames on it). Text must be valid Unicode: what a role gives (events, outputs) is checked where
    it is made, errors are ``results.storable``.
    """
    return _ENCODER.encode(message)


def from_wire(data: bytes, kinds: tuple[type[Any], ...] = WIRE) -> Any:
    """The message ``to_wire`` made, of one of ``kinds`` (a backend adds its own to the shared ones).

    Raises ``ValueError`` (msgspec's errors are ones) for bytes that are not such a message.
    """
    return _decoder(kinds).decode(data)


@functools.cache
def _decoder(kinds: tuple[type[Any], ...]) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(Union[kinds])  # noqa: UP007 - a Union of a runtime tuple of classes
