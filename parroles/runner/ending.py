"""What an ended run's record says: the result its caller gets, and the columns its ledger row gets."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from parroles.digests import canonical_json, content_digest
from parroles.errors import MemoryLimitExceeded, RoleTimeout
from parroles.results import Cost, ErrorInfo, Reason, RoleRunResult, RunStatus
from parroles.roles import output_from_json
from parroles.runner.tracked import TrackedRun

NULL_DIGEST = content_digest(b"null")  # the output of every role that returns None


@dataclasses.dataclass(slots=True)  # made and dropped once a run: a frozen dataclass's init costs 3x
class Ending:
    status: RunStatus
    output_json: str | None = None
    output_kind: str | None = None
    error: ErrorInfo | None = None
    reason: Reason | None = None
    cancelled_by: str | None = None
    finished_at: float | None = None
    duration_ms: float | None = None
    cost: Cost | None = None

    def result(self, run: TrackedRun, attempts: tuple[str, ...]) -> RoleRunResult:
        output = output_from_json(self.output_json, self.output_kind) if self.output_json is not None else None
        return RoleRunResult(role=run.role, run_id=run.run_id, status=self.status, output=output, error=self.error,
                             duration_ms=self.duration_ms, attempt=run.attempt, reason=self.reason,
                             cancelled_by=self.cancelled_by, attempts=attempts, reused_from=run.reused_from,
                             cost=self.cost, started_at=run.started_wall)

    def digest(self) -> str | None:
        if not self.output_json:
            return None
        return NULL_DIGEST if self.output_json == "null" else content_digest(self.output_json.encode())

    def columns(self, run: TrackedRun, digest: str | None) -> dict[str, Any]:
        """Only what this run has: fewer columns for the group commit to carry."""
        columns = {"finished_at": self.finished_at or time.time(), "duration_ms": self.duration_ms,
                   "output": self.output_json, "output_kind": self.output_kind, "output_digest": digest,
                   "ready_at": run.ready_at if run.ready_later else None,
                   "error": canonical_json(self.error.to_dict()) if self.error else None,
                   "reason": self.reason.value if self.reason else None, "cancelled_by": self.cancelled_by}
        if self.cost is not None:  # by hand: dataclasses.asdict deep-copies, 40 us a run
            cost = self.cost
            columns |= {"cpu_user_ms": cost.cpu_user_ms, "cpu_system_ms": cost.cpu_system_ms,
                        "max_rss_bytes": cost.max_rss_bytes}
        if run.reused_from is not None:  # it did not run: it started and ended as it was found
            columns |= {"reused_from": run.reused_from, "started_at": columns["finished_at"]}
        if run.started_wall is None:  # never started: its key (if it got one) is recorded with its end
            columns |= run.key_columns()
        return {name: value for name, value in columns.items() if value is not None}


def timeout_error(run: TrackedRun, traceback: str) -> ErrorInfo:
    return ErrorInfo.of(RoleTimeout, f"timed out after {run.timeout:g} s", traceback)


def stop_error(run: TrackedRun, now: float, grace: float) -> ErrorInfo:
    """The error of a run whose worker was killed for its own timeout (after its grace) or its memory_limit
    (at once)."""
    if run.stop is not None and run.stop.reason is Reason.MEMORY:
        return ErrorInfo.of(MemoryLimitExceeded, f"its processes held {size(run.peak_rss)} resident, over its "
                            f"memory_limit of {size(run.memory_limit)}: killed",
                            "its worker and every process under it were killed as soon as the limit was seen passed")
    return timeout_error(run, f"its worker was killed {since_told(run, now, grace)}")


def killed_cost(run: TrackedRun) -> Cost | None:
    """What is known of the cost of a run whose worker was killed: the peak its memory watch saw, if any."""
    return Cost(None, None, run.peak_rss) if run.peak_rss is not None else None


def size(count: int | None) -> str:
    """Bytes for a person: 1.5 GiB, 512 MiB."""
    if count is None:
        return "an unknown amount"
    value, unit = float(count), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.3g} {unit}" if unit != "bytes" else f"{count} bytes"


def wall_timing(run: TrackedRun) -> dict[str, Any]:
    """When a run ended and how long it ran, by the parent's clock (its worker could not say)."""
    now = time.time()
    duration = (now - run.started_wall) * 1000 if run.started_wall is not None else None
    return {"finished_at": now, "duration_ms": duration}


def since_told(run: TrackedRun, now: float, grace: float) -> str:
    """How long after it was told to stop a run's worker was killed, and why then: what happened."""
    stop = run.stop
    after = now - stop.told_at if stop is not None else 0.0
    why = "a second signal cut its grace short" if stop is not None and stop.grace_cut else f"its grace is {grace:g} s"
    return f"{after:.1f} s after the role was told to stop ({why})"
