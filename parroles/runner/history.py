"""What the ledger knows of how long a batch's roles take: the expected duration of each (parent only).

A role's expected duration is the median of its last ``RECENT`` COMPLETED
runs in the ledger (reused ones aside: they took no time) with the same role
name and the same code part of their cache key (``cache.keys``), so a role
whose code changed starts from no history. It is read once as the batch
starts, in one query; ``runner.ready`` starts the longest first.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from parroles.cache.code import NotReusable
from parroles.digests import canonical_json
from parroles.pipeline import Role

if TYPE_CHECKING:
    from parroles.ledger import Ledger

RECENT = 5  # runs a role's expected duration is the median of
LOOKED_AT = 4 * RECENT  # a role's last runs read (whatever their code): those of its code now are among them

# The last runs of each role first (no JSON read for older ones), then their code part: a ledger's long
# history of a role costs a sort of a few columns, not a JSON parse of every run.
_HISTORY_SQL = """
    SELECT role, (cache_parts->'$.code')::VARCHAR, duration_ms
    FROM runs
    WHERE status = 'COMPLETED' AND coalesce(reason, '') <> 'reused' AND duration_ms IS NOT NULL
      AND cache_parts IS NOT NULL AND role IN (SELECT unnest(?::VARCHAR[]))
    QUALIFY row_number() OVER (PARTITION BY role ORDER BY finished_at DESC) <= ?
    ORDER BY finished_at DESC
"""


def expected_durations(ledger: Ledger, roles: Sequence[Role], code_of: Callable[[Role], str]) -> dict[int, float]:
    """Each role's expected duration in ms, by position; a role with no such history is left out."""
    history: dict[tuple[str, str], list[float]] = {}
    for role, code, duration in ledger.query(_HISTORY_SQL, [sorted({str(r.name) for r in roles}), LOOKED_AT]):
        if code is not None:
            durations = history.setdefault((role, _canonical(code)), [])
            if len(durations) < RECENT:
                durations.append(duration)
    expected = {}
    for position, role in enumerate(roles):
        try:
            code = code_of(role)  # canonical JSON already, computed once per function
        except NotReusable:
            continue
        recent = history.get((str(role.name), code))
        if recent:
            expected[position] = _median(recent)
    return expected


def _median(values: list[float]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _canonical(code_json: str) -> str:
    """The code part as the one text ``cache.keys`` makes, however DuckDB printed it back."""
    return canonical_json(json.loads(code_json))
