"""Two batches side by side: each role matched by its name (a matrix expansion by its expanded name,
``train[lr=0.1]``), how it ended in each (its last attempt), and what changed."""

from __future__ import annotations

import dataclasses
from typing import Any

from parroles.report.data import BatchView
from parroles.results import Reason, RunRecord, RunStatus

SLOWER = 1.2  # a role took more than this many times as long: "slower by >20 %"
FASTER = 1 / SLOWER
NOISE_MS = 20.0  # a role that took less than this in both batches is not counted slower or faster: its time is
# mostly the worker's own jitter (a no-op role's runs differ by 3x and more)


@dataclasses.dataclass(frozen=True)
class RoleChange:
    """One role in both batches; ``None`` where a side has nothing to say (no duration, no output)."""

    role: str
    status_a: RunStatus
    status_b: RunStatus
    duration_ms_a: float | None
    duration_ms_b: float | None
    output_changed: bool | None  # None: a side has no output digest (it did not complete)
    params_changed: bool
    reused_a: bool
    reused_b: bool

    @property
    def ratio(self) -> float | None:
        """Duration B / duration A, when both ran and completed (a reused run took no time of its own; one that
        failed or was cancelled stopped early or late, which says nothing of its speed)."""
        a, b = self.duration_ms_a, self.duration_ms_b
        both_ran = not (self.reused_a or self.reused_b) and self.status_a is self.status_b is RunStatus.COMPLETED
        if a is None or b is None or a <= 0 or not both_ran:
            return None
        return b / a

    @property
    def slower(self) -> bool:
        """It took more than SLOWER times as long, and long enough to tell (NOISE_MS)."""
        return self.ratio is not None and self.ratio > SLOWER and self._measurable

    @property
    def faster(self) -> bool:
        return self.ratio is not None and self.ratio < FASTER and self._measurable

    @property
    def _measurable(self) -> bool:
        return max(self.duration_ms_a or 0.0, self.duration_ms_b or 0.0) >= NOISE_MS

    def to_dict(self) -> dict[str, Any]:
        """Its fields and its ratio, as ``parroles diff --json`` gives them."""
        return {**{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}, "ratio": self.ratio}

    @property
    def newly_failing(self) -> bool:
        return self.status_a is RunStatus.COMPLETED and self.status_b is not RunStatus.COMPLETED

    @property
    def newly_completing(self) -> bool:
        return self.status_a is not RunStatus.COMPLETED and self.status_b is RunStatus.COMPLETED


@dataclasses.dataclass(frozen=True)
class BatchDiff:
    """Batch A against batch B: the roles both have, in B's role order, and those only one has."""

    batch_a: str
    batch_b: str
    changes: tuple[RoleChange, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def counts(self) -> dict[str, int]:
        """What the summary line counts, by what it calls them."""
        return {
            "slower by >20 %": sum(change.slower for change in self.changes),
            "faster by >20 %": sum(change.faster for change in self.changes),
            "newly failing": sum(change.newly_failing for change in self.changes),
            "newly completing": sum(change.newly_completing for change in self.changes),
            "outputs changed": sum(change.output_changed is True for change in self.changes),
            "params changed": sum(change.params_changed for change in self.changes),
            f"only in {self.batch_a}": len(self.only_a),
            f"only in {self.batch_b}": len(self.only_b),
        }

    def to_dict(self) -> dict[str, Any]:
        """Its fields, its counts and its summary line, as ``parroles diff --json`` gives them."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**fields, "changes": [change.to_dict() for change in self.changes], "counts": self.counts,
                "summary": self.summary()}

    def summary(self) -> str:
        """One line: each count that is not zero, e.g. ``3 slower by >20 %, 1 newly failing``."""
        said = [f"{count} {_SINGULAR.get(what, what) if count == 1 else what}" for what, count in self.counts.items()
                if count]
        return ", ".join(said) if said else "no differences in status, time, output or params"


_SINGULAR = {"outputs changed": "output changed"}  # "1 output changed", not "1 outputs changed"


def compare(a: BatchView, b: BatchView) -> BatchDiff:
    """What changed from batch ``a`` to batch ``b``, role by role."""
    old, new = a.latest, b.latest
    changes = tuple(_change(old[name], new[name]) for name in new if name in old)
    return BatchDiff(a.batch.batch_id, b.batch.batch_id, changes,
                     tuple(name for name in old if name not in new), tuple(name for name in new if name not in old))


def _change(a: RunRecord, b: RunRecord) -> RoleChange:
    outputs_known = a.output_digest is not None and b.output_digest is not None
    return RoleChange(str(b.role), a.status, b.status, a.summary.duration_ms, b.summary.duration_ms,
                      a.output_digest != b.output_digest if outputs_known else None,
                      (a.params or {}) != (b.params or {}), a.reason is Reason.REUSED, b.reason is Reason.REUSED)
