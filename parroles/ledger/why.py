"""Why a run ran (or was reused): its cache key's parts, and which of them differ from another run's.

``parroles why RUN`` compares a run with the most recent earlier run of the
same role that has a key, or with the run given; a reused run names the run
it took its output from. The parts and their comparison are
``parroles.cache.keys``'; this module only finds the runs in the ledger.
"""

from __future__ import annotations

import dataclasses

from parroles.cache.keys import differences
from parroles.ledger.file import Ledger
from parroles.results import RunRecord

_EARLIER_SQL = """
    SELECT run_id::VARCHAR FROM runs
    WHERE role = ? AND cache_parts IS NOT NULL AND queued_at < ?
    ORDER BY queued_at DESC LIMIT 1
"""


@dataclasses.dataclass(frozen=True)
class Why:
    """A run, what it was compared with (None: no earlier run of its role has a key), and what differs."""

    run: RunRecord
    against: RunRecord | None
    differences: list[str]
    source: RunRecord | None  # a reused run's: the run whose output it took

    @property
    def same_key(self) -> bool:
        return self.against is not None and self.run.cache_key is not None and \
            self.run.cache_key == self.against.cache_key


def explain(ledger: Ledger, run_id: str, against: str | None = None) -> Why:
    """``run_id``'s key compared with ``against``'s, or with the most recent earlier run of its role."""
    record = ledger.get_run(ledger.resolve_run_id(run_id))
    if record.cache_parts is None:  # nothing to compare: said by the caller (it never was about to start)
        return Why(record, None, [], None)
    other = ledger.get_run(ledger.resolve_run_id(against)) if against is not None else _earlier(ledger, record)
    source = ledger.get_run(record.reused_from) if record.reused_from is not None else None
    found = differences(other.cache_parts or {}, record.cache_parts) if other is not None else []
    return Why(record, other, found, source)


def _earlier(ledger: Ledger, record: RunRecord) -> RunRecord | None:
    rows = ledger.query(_EARLIER_SQL, [str(record.role), record.queued_at])
    return ledger.get_run(rows[0][0]) if rows else None
