"""Plain records: run statuses, results returned to callers, rows read from the ledger."""

from __future__ import annotations

import builtins
import dataclasses
import datetime as dt
import enum
import math
import re
import traceback
from collections.abc import Iterator, Sequence
from typing import Any, overload

from parroles.errors import ConfigError
from parroles.roles import RoleName


class RunStatus(str, enum.Enum):
    """A run's status, stored in the ledger as these exact strings."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class Reason(str, enum.Enum):
    """Why a run was FAILED or CANCELLED by parroles rather than by its own code, or COMPLETED without running."""

    ERROR = "error"  # the role raised
    FAIL_FAST = "fail_fast"  # a sibling failed under fail_fast
    TIMEOUT = "timeout"  # the role's own timeout
    CRASH = "crash"  # its worker process died
    INTERRUPTED = "interrupted"  # SIGINT reached the parent
    TERMINATED = "terminated"  # SIGTERM reached the parent
    CHANNEL_LOST = "cancel_channel_lost"  # what carries the batch-wide stop died (loky: the Manager process)
    ORPHANED = "orphaned"  # the parent died; found on the next open
    OUTPUT = "output"  # the output could not be stored
    UPSTREAM = "upstream"  # a role it needs failed or was cancelled: it never started
    HANDOFF = "handoff"  # a handoff token it was given did not verify
    MEMORY = "memory"  # its processes outgrew its memory_limit and were killed
    REUSED = "reused"  # COMPLETED without running: a run with its cache key had completed (reused_from)

    def __str__(self) -> str:
        return self.value


class BatchState(str, enum.Enum):
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    INTERRUPTED = "INTERRUPTED"
    CRASHED = "CRASHED"

    def __str__(self) -> str:
        return self.value


# What a ``retry_on`` reason names.
RETRY_REASONS: dict[str, Reason] = {
    "crash": Reason.CRASH, "timeout": Reason.TIMEOUT, "error": Reason.ERROR, "memory": Reason.MEMORY}


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?(?:e\+?\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


MAX_THREADS = 4096  # the most a thread cap may be (``runs.threads`` is an INTEGER; no library uses more)


def threads_error(value: Any) -> str | None:
    """What is wrong with ``value`` as a thread cap (None: nothing)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_THREADS:
        return f"threads must be an integer from 1 to {MAX_THREADS}, got {value!r}"
    return None


def bytes_of(value: Any, name: str) -> int:
    """A size given as bytes (a number: 1000000, 1e9) or text ("512MB" or "512M", "2GiB" or "2Gi": decimal and
    binary units, as Dask reads them); ConfigError naming ``name`` otherwise."""
    text = value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = repr(value) if math.isfinite(value) else ""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    count = 0
    if match is not None:
        unit = (match[2] or "b").lower()
        count = int(float(match[1]) * _UNITS[unit if unit == "b" else unit.removesuffix("b")])
    if count < 1:  # "0.5" is no byte
        raise ConfigError(f"{name} must be a size in bytes, e.g. 2GiB, 512MB or 1000000, got {value!r}")
    return count


def check_retry_on(values: Sequence[str]) -> tuple[str, ...]:
    """``retry_on`` as given, checked: reasons, ``exit:N``, or exception type names; ValueError otherwise."""
    checked = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"it takes reasons, exception type names or 'exit:N', got {value!r}")
        if value.startswith("exit:") and not value[5:].lstrip("-").isdigit():
            raise ValueError(f"{value!r} is no exit code (write 'exit:75')")
        if value not in RETRY_REASONS and not value.startswith("exit:") and not all(
                part.isidentifier() for part in value.split(".")):
            raise ValueError(f"{value!r} is no reason ({', '.join(RETRY_REASONS)}), exit code or type name")
        checked.append(value)
    return tuple(checked)



@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0  # attempts after the first
    delay: float = 1.0  # seconds before the second attempt
    backoff: float = 2.0  # each later delay is this many times the one before
    jitter: float = 0.1  # each delay is moved by up to this fraction, either way
    max_delay: float = 60.0
    on: tuple[str, ...] = ("crash", "timeout", "memory")


@dataclasses.dataclass(frozen=True)
class Failure:
    """What the book knows of an attempt that FAILED, to decide on the next."""

    reason: Reason | None
    error_types: Sequence[str] = ()  # its exception's class and bases, qualified and plain names
    exit_code: int | None = None  # a command role's program's
    asked_after: float | None = None  # it raised Retry(after=...): None if it did not ask, -1.0 if no delay given


def should_retry(policy: RetryPolicy, attempt: int, failure: Failure) -> bool:
    """Whether attempt number ``attempt``, which failed so, gets another."""
    if attempt > policy.retries:
        return False
    if failure.asked_after is not None:
        return True
    for wanted in policy.on:
        if wanted in RETRY_REASONS:
            if failure.reason is RETRY_REASONS[wanted]:
                return True
        elif wanted.startswith("exit:"):
            if failure.exit_code is not None and failure.exit_code == int(wanted[5:]):
                return True
        elif failure.reason is Reason.ERROR and wanted in failure.error_types:
            return True
    return False


def storable(text: str) -> str:
    """``text`` as the ledger can hold it: a lone surrogate (a file name read with surrogateescape, say)
    is written as its escape, ``\\udc80``, instead of making the whole record unstorable."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def type_name(kind: type[BaseException]) -> str:
    """The name an error type is recorded by: a name its reader can import.

    A built-in's bare name (``ValueError``); parroles' own as ``parroles.X``
    (every error class of ``parroles.errors`` is exported from ``parroles``);
    any other ``module.QualifiedName``.
    """
    if kind.__module__ == "builtins":
        return kind.__qualname__
    if kind.__module__ == "parroles.errors":
        return f"parroles.{kind.__qualname__}"
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclasses.dataclass(frozen=True)
class FailedNeed:
    """A needed role that did not complete, as a role run with ``on_failed_needs="run"`` is told of it."""

    status: str  # FAILED or CANCELLED
    reason: str | None  # its run's reason: error, timeout, crash, upstream...


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    """What went wrong in a run: exception type, message and traceback text."""

    type: str
    message: str
    traceback: str = ""

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, kind: builtins.type[BaseException], message: str, traceback: str = "") -> ErrorInfo:
        """An error parroles records itself (a timeout, a crash...), named as ``from_exception`` names it."""
        return cls(type_name(kind), storable(message), storable(traceback))

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """The one place an exception becomes text: never raises, never pickles the exception."""
        name = type_name(type(exc))
        try:
            message = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
            message = f"<{name} whose str() failed>"
        try:
            text = "".join(traceback.format_exception(exc))
        except Exception:  # noqa: BLE001 - as above
            text = ""
        return cls(name, storable(message), storable(text))

    def one_line(self) -> str:
        first = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.type}: {first}" if first else self.type


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a run cost (``backends.usage``): CPU time of its worker and children, its peak resident memory.

    A run killed for its ``memory_limit`` has only the peak its watch saw: its CPU time is None.
    """

    cpu_user_ms: float | None
    cpu_system_ms: float | None
    max_rss_bytes: int | None

    @property
    def cpu_ms(self) -> float | None:
        if self.cpu_user_ms is None or self.cpu_system_ms is None:
            return None
        return round(self.cpu_user_ms + self.cpu_system_ms, 3)


@dataclasses.dataclass(frozen=True)
class RoleRunResult:
    """The outcome of one role, as returned by ``execute_roles_parallel``."""

    role: RoleName
    run_id: str
    status: RunStatus
    output: Any = None
    error: ErrorInfo | None = None
    duration_ms: float | None = None
    attempt: int = 1
    reason: Reason | None = None
    cancelled_by: str | None = None
    attempts: tuple[str, ...] = ()  # the run ids of every attempt, first to last (this one last)
    reused_from: str | None = None  # COMPLETED without running: the run whose output it took (reason reused)
    cost: Cost | None = None  # None: it did not run, or its worker could not say (it died)
    started_at: float | None = None  # wall clock (time.time()), as its worker read it

    @property
    def success(self) -> bool:
        return self.status is RunStatus.COMPLETED


@dataclasses.dataclass(frozen=True)
class RunUpdate:
    """A run changed status (what progress displays follow). ``result`` is set once terminal."""

    position: int
    role: RoleName
    run_id: str
    status: RunStatus
    attempt: int
    result: RoleRunResult | None = None


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """A run's summary: its events, final state digest, run time and whether it succeeded."""

    total_events: int
    final_state_digest: str | None
    duration_ms: float | None
    success: bool


@dataclasses.dataclass(frozen=True)
class LogLine:
    """A line a run wrote to its stdout or stderr."""

    seq: int
    stream: str  # "stdout" or "stderr"
    line: str
    ts: dt.datetime


@dataclasses.dataclass(frozen=True)
class RunEvent:
    seq: int
    kind: str
    payload: Any
    timestamp: dt.datetime


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``, as read back from the ledger."""

    run_id: str
    spec_digest: str | None
    metadata: dict[str, Any]  # git_sha, agent_name, tags
    status: RunStatus
    summary: RunSummary
    created_at: dt.datetime
    completed_at: dt.datetime | None
    parent_run_id: str
    role: RoleName
    queued_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    output: Any
    output_digest: str | None
    error: ErrorInfo | None
    reason: Reason | None
    cancelled_by: str | None
    attempt: int
    worker_pid: int | None
    worker_host: str | None
    position: int | None = None
    ready_at: dt.datetime | None = None
    params: dict[str, Any] | None = None
    matrix_of: str | None = None
    output_kind: str | None = None
    retry_of: str | None = None
    cache_key: str | None = None  # None: computed by no parroles before, or not reusable (cache_parts says why)
    cache_parts: dict[str, Any] | None = None
    reused_from: str | None = None  # the run whose output a reused run took (the one that ran)
    cost: Cost | None = None  # what it cost, as its worker measured (None: it did not run, or died)
    threads: int | None = None  # the thread cap it ran under (None: none that parroles set)


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """One row of ``batches``, with its runs' counts by status."""

    batch_id: str
    name: str | None
    spec_digest: str | None
    config: dict[str, Any]
    state: BatchState
    started_at: dt.datetime
    finished_at: dt.datetime | None
    counts: dict[str, int]
    owner_host: str
    owner_pid: int
    n_roles: int | None = None
    owner_started: float | None = None
    spec_path: str | None = None  # the spec file it ran (``parroles resume`` runs it again)
    resumed_from: str | None = None  # the batch whose completed runs it was allowed to reuse
    run_order: str | None = None  # the order its ready roles started in (``config.order``)


class BatchResult(Sequence[RoleRunResult]):
    """What ``parroles.run`` returns: one ``RoleRunResult`` per role, in the order of the roles given."""

    def __init__(self, batch_id: str, results: Sequence[RoleRunResult]) -> None:
        self.batch_id = batch_id
        self._results = list(results)

    @overload
    def __getitem__(self, index: int) -> RoleRunResult: ...

    @overload
    def __getitem__(self, index: slice) -> list[RoleRunResult]: ...

    def __getitem__(self, index: int | slice) -> RoleRunResult | list[RoleRunResult]:
        return self._results[index]

    def __len__(self) -> int:
        return len(self._results)

    def __iter__(self) -> Iterator[RoleRunResult]:
        return iter(self._results)

    @property
    def ok(self) -> bool:
        """Every role COMPLETED."""
        return all(result.success for result in self._results)

    @property
    def by_role(self) -> dict[str, RoleRunResult]:
        """The results by role name."""
        return {str(result.role): result for result in self._results}

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for result in self._results:
            counts[result.status.value] = counts.get(result.status.value, 0) + 1
        return f"BatchResult({self.batch_id!r}, {counts})"
