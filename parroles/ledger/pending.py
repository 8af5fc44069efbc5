"""Records waiting for the ledger writer's next commit, and their Arrow form.

Nothing here touches the file: ``ledger.writer`` takes a ``Pending`` and
writes it in one transaction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from parroles.ledger.schema import RUN_COLUMNS

if TYPE_CHECKING:
    import pyarrow


@dataclasses.dataclass(frozen=True)
class NewRuns:
    """QUEUED runs of one parent run, kept as columns until they are inserted.

    What the runs of a batch share is stored once; a batch of 100,000 roles
    costs three lists, not 100,000 dicts, and becomes an Arrow table in C++.
    Status, ``agent_name`` ("role:<role>") and ``tags`` (``{parent_run_id,
    role}``) are filled in by the insert.
    """

    run_ids: list[str]
    positions: list[int]
    roles: list[str]
    parent_run_id: str
    spec_digest: str | None
    git_sha: str | None
    queued_at: float
    params: list[str | None] | None = None  # each run's keyword arguments as JSON; None: none has any
    matrix_of: list[str | None] | None = None  # the role each matrix expansion came from; None: none is one
    waiting: list[bool] | None = None  # which runs wait for others (ready later); None: none does
    attempts: list[int] | None = None  # each run's attempt number; None: all first attempts
    retry_of: list[str | None] | None = None  # the attempt each one follows; None: none does

    def __len__(self) -> int:
        return len(self.run_ids)


@dataclasses.dataclass
class Pending:
    """Records not yet committed; transitions coalesced per run."""

    batches: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    batch_updates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    new_runs: list[NewRuns] = dataclasses.field(default_factory=list)
    run_updates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    events: list[tuple[str, int, str, str | None, float]] = dataclasses.field(default_factory=list)
    # (token_id, from_run_id, to_run_id, output_digest, created_at)
    handoffs: list[tuple[str, str, str, str, float]] = dataclasses.field(default_factory=list)
    logs: list[tuple[str, int, str, str, float]] = dataclasses.field(default_factory=list)  # run_id, seq, stream...
    new_run_count: int = 0

    def __bool__(self) -> bool:
        return bool(self.batches or self.batch_updates or self.new_runs or self.run_updates or self.events
                    or self.handoffs or self.logs)

    def size(self) -> int:
        """Records pending, as rows to write."""
        return self.new_run_count + len(self.run_updates) + len(self.events) + len(self.handoffs) + len(self.logs)

    def rows(self) -> int:
        """Rows these records insert or change: what "N records" means to users."""
        return self.size() + len(self.batches) + len(self.batch_updates)

    def add_runs(self, runs: NewRuns) -> None:
        self.new_runs.append(runs)
        self.new_run_count += len(runs)

    def to_plain(self) -> dict[str, Any]:
        """These records as plain values (what the journal stores)."""
        return {"batches": self.batches, "batch_updates": self.batch_updates,
                # Not dataclasses.asdict: it copies every list element by element.
                "new_runs": [vars(runs) for runs in self.new_runs],
                "run_updates": self.run_updates, "events": self.events, "handoffs": self.handoffs,
                "logs": self.logs}

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> Pending:
        """The inverse of ``to_plain``."""
        pending = cls(dict(plain["batches"]), dict(plain["batch_updates"]),
                      run_updates=dict(plain["run_updates"]), events=[tuple(e) for e in plain["events"]],
                      handoffs=[tuple(h) for h in plain.get("handoffs", ())],
                      logs=[tuple(line) for line in plain.get("logs", ())])
        for runs in plain["new_runs"]:
            pending.add_runs(NewRuns(**runs))
        return pending

    def absorb(self, later: Pending) -> None:
        """Put ``later`` behind this one (used to requeue a failed commit)."""
        self.batches.update(later.batches)
        for key, cols in later.batch_updates.items():
            self.update_batch(key, cols)
        for runs in later.new_runs:
            self.add_runs(runs)
        for key, cols in later.run_updates.items():
            self.run_updates.setdefault(key, {}).update(cols)
        self.events.extend(later.events)
        self.handoffs.extend(later.handoffs)
        self.logs.extend(later.logs)

    def update_batch(self, batch_id: str, cols: dict[str, Any]) -> None:
        """A batch's later columns: into its insert when that still waits, else into its update."""
        row = self.batches.get(batch_id)
        if row is not None:
            row.update(cols)
        elif (update := self.batch_updates.get(batch_id)) is not None:
            update.update(cols)
        else:
            self.batch_updates[batch_id] = dict(cols)


RUN_TYPES = dict(RUN_COLUMNS)  # a runs column -> the Arrow type it travels as


def present_columns(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Every column some row sets (set.union walks the dicts' keys in C)."""
    return set().union(*rows)


def arrow_type(name: str) -> pyarrow.DataType:
    """The Arrow type a ``runs`` column travels as (``schema.RUN_COLUMNS``)."""
    return arrow_type_of(RUN_TYPES[name])


def arrow_type_of(kind: str) -> pyarrow.DataType:
    """The Arrow type named "string", "int64", "float64" or "bool" (the one map of those names)."""
    import pyarrow as pa

    return {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}[kind]


def arrow_table(rows: Sequence[Mapping[str, Any] | None], names: Iterable[str]) -> pyarrow.Table:
    """Row dicts as an Arrow table of ``names`` (absent keys, and rows that are None, are nulls), converted in
    C++."""
    import pyarrow as pa

    struct = pa.struct([(name, arrow_type(name)) for name in names])
    return pa.Table.from_struct_array(pa.array(rows, type=struct))


def arrow_column(values: list[Any], name: str) -> pyarrow.Array:
    import pyarrow as pa

    return pa.array(values, type=arrow_type(name))
