"""What the parent's book keeps of each run of a batch (parent process only)."""

from __future__ import annotations

import dataclasses
import enum
import signal

from parroles.results import FailedNeed, Reason, RoleRunResult
from parroles.roles import RoleName


class RunPhase(enum.Enum):
    QUEUED = "queued"  # in the parent's own queue
    DISPATCHED = "dispatched"  # handed to the backend, not started
    RUNNING = "running"  # its worker reported the start
    DONE = "done"  # terminal in the ledger


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


@dataclasses.dataclass
class TrackedRun:
    position: int
    role: RoleName
    name: str
    run_id: str
    timeout: float | None
    starts: int = 0  # times a worker started it: its attempt number once started
    phase: RunPhase = RunPhase.QUEUED
    dispatch_id: int | None = None
    started_wall: float | None = None
    stop_cause: Reason | None = None  # why the parent told it to stop, once it did
    told_at: float | None = None  # monotonic time it was told to stop
    grace_cut: bool = False  # a second signal ended its grace early
    cancel_due: float | None = None  # monotonic time its own timeout expires
    kill_due: float | None = None  # monotonic time its worker is to be killed
    needs: tuple[int, ...] = ()  # positions of the roles it needs
    runs_after_failed_needs: bool = False  # on_failed_needs="run": it starts once its needs ended, however
    failed_needs: dict[str, FailedNeed] = dataclasses.field(default_factory=dict)  # need -> how it ended
    upstream_cause: TrackedRun | None = None  # the run whose end cancelled it (upstream), named by it and by its own
    ready_at: float | None = None  # when its needs were met (wall clock); recorded with its next transition
    output_json: str | None = None  # once COMPLETED: what the roles that need it are handed
    output_digest: str | None = None
    output_kind: str | None = None
    handed: list[tuple[str, str, str, str, float]] = dataclasses.field(default_factory=list)  # rows, once started
    result: RoleRunResult | None = None

    @property
    def attempt(self) -> int:
        return max(self.starts, 1)
