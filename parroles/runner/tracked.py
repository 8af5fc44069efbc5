"""What the parent's book keeps of each run of a batch, and of a signal that reached it (parent process only)."""

from __future__ import annotations

import dataclasses
import os
import signal

from parroles.backends.protocol import Finished
from parroles.cache.keys import Key
from parroles.results import FailedNeed, Reason, RetryPolicy, RoleRunResult
from parroles.roles import RoleName
from parroles.runner.lifecycle import Happening, RunState, Stop, next_state


@dataclasses.dataclass(frozen=True)
class Interrupt:
    """A signal that reached the parent during the batch."""

    signum: int
    name: str
    reason: Reason

    @classmethod
    def of(cls, signum: int) -> Interrupt:
        reason = Reason.INTERRUPTED if signum == signal.SIGINT else Reason.TERMINATED
        return cls(signum, signal.Signals(signum).name, reason)


@dataclasses.dataclass(slots=True)  # a batch makes one per role: slots make it cheaper to make and to read
class TrackedRun:
    """One run of the batch as the parent's book keeps it: its state, and what its records need."""

    position: int
    role: RoleName
    name: str
    run_id: str
    timeout: float | None
    needs: tuple[int, ...] = ()  # positions of the roles it needs
    runs_after_failed_needs: bool = False  # on_failed_needs="run": it starts once its needs ended, however
    state: RunState = RunState.READY
    number: int = 1  # its attempt: 1, then 2, 3... for the retries of the same role (each a run of its own)
    retry_of: str | None = None  # the attempt it follows
    retry_at: float | None = None  # loop clock: when it may start, while BACKING_OFF
    policy: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    params_json: str | None = None  # as recorded with its first attempt (each attempt is recorded with it)
    matrix_of: str | None = None
    threads: int | None = None  # its own thread cap (the role's, else the batch's); None: its worker's
    memory_limit: int | None = None  # bytes its processes may hold (this attempt's); None: no limit
    peak_rss: int | None = None  # the most its processes were seen to hold, when its memory_limit was passed
    dispatch_id: int | None = None
    started_wall: float | None = None
    timeout_at: float | None = None  # loop clock: when its own timeout expires, while it runs
    stop: Stop | None = None  # once told to stop
    held_end: Finished | None = None  # HELD with its end: reported once the cause of the cancel is known
    failed_needs: dict[str, FailedNeed] = dataclasses.field(default_factory=dict)  # need -> how it ended
    upstream_cause: TrackedRun | None = None  # the run whose end cancelled it (upstream), named by it and by its own
    ready_at: float | None = None  # when its needs were met (wall clock); recorded with its next transition
    output_json: str | None = None  # once COMPLETED: what the roles that need it are handed
    output_digest: str | None = None
    output_kind: str | None = None
    handed: list[tuple[str, str, str, str, float]] = dataclasses.field(default_factory=list)  # rows, once started
    key: Key | None = None  # its cache key, computed as it is about to be dispatched (runner.reuse)
    reused_from: str | None = None  # COMPLETED without running: the run whose output it took
    result: RoleRunResult | None = None

    @property
    def attempt(self) -> int:
        return self.number

    @property
    def ready_later(self) -> bool:
        """Its ``ready_at`` comes with a transition: a first attempt that needs nothing was ready when queued
        (its insert says so); one that waited for its needs or its retry delay was ready when that ended."""
        return bool(self.needs) or self.retry_of is not None

    def key_columns(self) -> dict[str, str]:
        """Its key's columns, recorded with its start (or its end, if it never starts)."""
        if self.key is None:
            return {}
        columns = {"cache_parts": self.key.parts_json}
        if self.key.digest is not None:
            columns["cache_key"] = self.key.digest
        return columns

    def move(self, happening: Happening) -> None:
        """Move along the one table of a run's life (``lifecycle.TRANSITIONS``); InvalidTransition otherwise."""
        self.state = next_state(self.state, happening)


def new_run_ids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as text, as ``str(uuid.uuid4())`` makes them, at a third of its cost."""
    ids = []
    random = bytearray(os.urandom(16 * count))
    for start in range(0, 16 * count, 16):
        random[start + 6] = random[start + 6] & 0x0F | 0x40  # version 4
        random[start + 8] = random[start + 8] & 0x3F | 0x80  # the RFC 4122 variant
        text = random[start:start + 16].hex()
        ids.append(f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}")
    return ids
