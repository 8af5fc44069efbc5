"""What the ledger knows of how long a batch's roles take: the expected duration of each (parent only).

A role's expected duration is the median of its last ``RECENT`` COMPLETED
runs in the ledger (reused ones aside: they took no time) with the same role
name and the same code part of their cache key (``cache.keys``), so a role
whose code changed starts from no history. It is read once as the batch
starts, in one query; ``runner.ready`` starts the longest first.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from parroles.cache.code import NotReusable
from parroles.pipeline import Role

if TYPE_CHECKING:
    from parroles.ledger import Ledger

RECENT = 5  # runs a role's expected duration is the median of

_HISTORY_SQL = """
    SELECT role, code, list(duration_ms ORDER BY finished_at DESC)[1:?] FROM (
        SELECT role, (cache_parts->'$.code')::VARCHAR AS code, duration_ms, finished_at
        FROM runs
        WHERE status = 'COMPLETED' AND coalesce(reason, '') <> 'reused' AND duration_ms IS NOT NULL
          AND cache_parts IS NOT NULL AND role IN (SELECT unnest(?::VARCHAR[])))
    GROUP BY role, code
"""


def expected_durations(ledger: Ledger, roles: Sequence[Role], code_of: Callable[[Role], str]) -> dict[int, float]:
    """Each role's expected duration in ms, by position; a role with no such history is left out."""
    history: dict[tuple[str, str], list[float]] = {}
    for role, code, durations in ledger.query(_HISTORY_SQL, [RECENT, sorted({str(r.name) for r in roles})]):
        if code is not None:
            history[role, _canonical(code)] = durations
    expected = {}
    for position, role in enumerate(roles):
        try:
            code = _canonical(code_of(role))
        except NotReusable:
            continue
        durations = history.get((str(role.name), code))
        if durations:
            expected[position] = statistics.median(durations)
    return expected


def _canonical(code_json: str) -> str:
    """The code part as one text, however DuckDB printed it back."""
    return json.dumps(json.loads(code_json), sort_keys=True, separators=(",", ":"))
