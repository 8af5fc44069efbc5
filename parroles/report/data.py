"""One batch as the report and the diff read it: its record, every run, what each role needs, and the
last lines the runs that did not complete wrote.

What a role needs is read from the spec file the batch ran when it is still as it was (its digest is the
batch's ``spec_digest``): that alone names the needs of a role cancelled before its needs ended, which
got no handoff and no cache key. Otherwise (the Python API ran the batch, or the file changed) from the
ledger: the ``handoffs`` table (a completed need handed its output over), each run's ``cache_parts.needs``
(every need of a run that got as far as its key, also one that did not complete) and, for a run
cancelled upstream with nothing else known, the run that cancelled it (``cancelled_by``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Literal

from parroles.config import ParallelRoleConfig
from parroles.errors import ConfigError
from parroles.ledger import Ledger
from parroles.ledger.lineage import batch_handoffs
from parroles.results import BatchRecord, LogLine, Reason, RunRecord, RunStatus
from parroles.runner.history import parallel_efficiency

TAIL_LINES = 20  # lines of a failed or cancelled run's output the report shows
TAILS_READ = 200  # runs that did not complete whose output is read: the report details this many at most

NeedKind = Literal["handoff", "need", "cancelled_by"]


@dataclasses.dataclass(frozen=True)
class Need:
    """``needing`` needs ``needed`` (role names); ``kind`` says how it is known: a handoff was made, it is
    declared (spec or cache key) but nothing was handed, or only that ``needed``'s end cancelled it."""

    needed: str
    needing: str
    kind: NeedKind


@dataclasses.dataclass(frozen=True)
class BatchView:
    """A batch as recorded: ``runs`` are every attempt of every role, in role order."""

    batch: BatchRecord
    runs: tuple[RunRecord, ...]
    needs: tuple[Need, ...]
    needs_from: str  # where ``needs`` were read, for the reader of the report
    tails: Mapping[str, tuple[LogLine, ...]]  # run id -> the last lines a run that did not complete wrote

    @property
    def latest(self) -> dict[str, RunRecord]:
        """Each role's last attempt, by role name, in role order: how the role ended."""
        found: dict[str, RunRecord] = {}
        for run in self.runs:
            name = str(run.role)
            if name not in found or run.attempt >= found[name].attempt:
                found[name] = run
        return found

    @property
    def workers(self) -> int:
        """The worker slots the batch ran on (its config's, as ``ParallelRoleConfig.workers_for`` says)."""
        roles = self.batch.n_roles or len(self.latest) or 1
        known = {field.name for field in dataclasses.fields(ParallelRoleConfig)}
        try:
            config = ParallelRoleConfig(**{k: v for k, v in self.batch.config.items() if k in known})
        except (ConfigError, TypeError):  # a config an older parroles wrote: its slots alone matter here
            config = ParallelRoleConfig(max_concurrent=int(self.batch.config.get("max_concurrent") or 1))
        return config.workers_for(roles)

    @property
    def git_sha(self) -> str | None:
        return next((sha for run in self.runs if (sha := run.metadata.get("git_sha"))), None)

    @property
    def wall_seconds(self) -> float | None:
        end = self.batch.finished_at
        return None if end is None else (end - self.batch.started_at).total_seconds()

    @property
    def cpu_ms(self) -> float | None:
        spent = [run.cost.cpu_ms for run in self.runs if run.cost is not None and run.cost.cpu_ms is not None]
        return sum(spent) if spent else None

    @property
    def efficiency(self) -> float | None:
        """CPU time / (the time from the first run's start to the last one's end x worker slots), as the
        summary of ``parroles run`` gives it; None when no CPU time was recorded."""
        spans = [(run.started_at, run.finished_at) for run in self.runs
                 if run.started_at is not None and run.finished_at is not None]
        cpu = self.cpu_ms
        if cpu is None or not spans:
            return None
        wall = (max(end for _, end in spans) - min(start for start, _ in spans)).total_seconds()
        return parallel_efficiency(cpu, wall, self.workers)

    @property
    def origin(self) -> dt.datetime:
        """The moment the timeline starts at: the batch's start, or its first run's queueing if earlier."""
        return min([self.batch.started_at, *(run.queued_at for run in self.runs)])


def read_batch(ledger: Ledger, batch: str) -> BatchView:
    """The batch ``batch`` names (its id or the start of it); RunNotFoundError if none does."""
    record = ledger.get_batch(ledger.resolve_batch_id(batch))
    runs = tuple(ledger.list_runs(parent_run_id=record.batch_id))
    from_spec = _spec_edges(record)
    needs = _ledger_needs(ledger, record.batch_id, runs) if from_spec is None else tuple(
        Need(needed, needing, "need") for needed, needing in from_spec)
    if from_spec is not None:  # the spec names them all; the ledger says which were handed over
        handed = {(n.needed, n.needing) for n in _ledger_needs(ledger, record.batch_id, runs) if n.kind == "handoff"}
        needs = tuple(dataclasses.replace(n, kind="handoff") if (n.needed, n.needing) in handed else n
                      for n in needs)
    said = f"the spec file {record.spec_path}" if from_spec is not None else "the ledger (handoffs and cache keys)"
    unfinished = [run for run in runs if run.status in (RunStatus.FAILED, RunStatus.CANCELLED)][:TAILS_READ]
    found = ledger.get_log_tails([run.run_id for run in unfinished], TAIL_LINES)
    tails = {run.run_id: tuple(found.get(run.run_id, ())) for run in unfinished}
    return BatchView(record, runs, needs, said, tails)


def _spec_edges(record: BatchRecord) -> list[tuple[str, str]] | None:
    """The (needed, needing) pairs of the spec file the batch ran, if it is still the file that ran."""
    if record.spec_path is None or record.spec_digest is None:
        return None
    try:
        with open(record.spec_path, "rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != record.spec_digest:
                return None
        from parroles.spec import load_spec  # imports its roles' modules, as parroles graph does

        return load_spec(os.fspath(record.spec_path)).edges()
    except (OSError, ConfigError):  # gone, unreadable, or no longer loads: the ledger says what it can
        return None


def _ledger_needs(ledger: Ledger, batch_id: str, runs: Sequence[RunRecord]) -> tuple[Need, ...]:
    """What the ledger knows of the needs: handoffs, then cache keys' needs, then cancellations upstream."""
    role_of = {run.run_id: str(run.role) for run in runs}
    found: dict[tuple[str, str], NeedKind] = {}
    for handed in batch_handoffs(ledger, batch_id):  # each between two runs of the batch
        found.setdefault((handed.role, role_of[handed.to_run_id]), "handoff")
    for run in runs:
        for needed in (run.cache_parts or {}).get("needs") or {}:
            found.setdefault((needed, str(run.role)), "need")
    known = {needing for _, needing in found}
    for run in runs:
        cause = role_of.get(run.cancelled_by or "")
        if run.reason is Reason.UPSTREAM and cause is not None and str(run.role) not in known:
            found.setdefault((cause, str(run.role)), "cancelled_by")
    return tuple(Need(needed, needing, kind) for (needed, needing), kind in found.items())
