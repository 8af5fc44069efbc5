"""What the ledger knows of how long a batch's roles take: the expected duration of each (parent only).

A role's expected duration is the median of its last ``RECENT`` COMPLETED
runs in the ledger (reused ones aside: they took no time) with the same role
name and the same code part of their cache key (``cache.keys``), so a role
whose code changed starts from no history. It is read once as the batch
starts, in one query; ``runner.ready`` starts the longest first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    if not history:
        return {}
    expected, medians = {}, {key: _median(recent) for key, recent in history.items()}
    for position, role in enumerate(roles):
        try:
            code = code_of(role)  # canonical JSON already, computed once per function
        except NotReusable:
            continue
        median = medians.get((str(role.name), code))
        if median is not None:
            expected[position] = median
    return expected


def expected_from(path: str, roles: Sequence[Role], code_of: Callable[[Role], str]) -> dict[int, float]:
    """``expected_durations`` from the ledger at ``path``, read-only; none when it cannot be read now (the
    live view's ETA is a nicety: a busy or missing ledger leaves it out, and the batch says why itself)."""
    from parroles.errors import LedgerError
    from parroles.ledger import Ledger

    if not os.path.exists(path):
        return {}
    try:
        with Ledger(path, read_only=True, busy_timeout=0.2) as ledger:
            return expected_durations(ledger, roles, code_of)
    except LedgerError:
        return {}


def eta_seconds(expected_ms: Mapping[int, float], slots: int, elapsed: Mapping[int, float | None],
                ended: Iterable[int]) -> float | None:
    """Seconds the batch has left, from its roles' expected durations: what each unfinished role is expected
    to take (a role with no history, the mean of those with one), less what it ran so far, over ``slots``.
    None without any history. ``elapsed`` holds each started role's seconds so far."""
    if not expected_ms:
        return None
    typical = sum(expected_ms.values()) / len(expected_ms)
    done = set(ended)
    left_ms = sum(max(expected_ms.get(position, typical) - 1000 * (seconds or 0.0), 0.0)
                  for position, seconds in elapsed.items() if position not in done)
    return left_ms / 1000 / max(slots, 1)


def parallel_efficiency(cpu_ms: float, wall_seconds: float, slots: int) -> float | None:
    """A batch's CPU time over the wall time its roles ran in times its worker slots (``parroles run``'s
    summary and the report say it so); None when no wall time passed."""
    return cpu_ms / 1000 / (wall_seconds * slots) if wall_seconds > 0 else None


def _median(values: list[float]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _canonical(code_json: str) -> str:
    """The code part as the one text ``cache.keys`` makes, however DuckDB printed it back."""
    return canonical_json(json.loads(code_json))
