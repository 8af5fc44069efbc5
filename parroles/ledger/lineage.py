"""Lineage: what each run was handed, read from the ``handoffs`` table (one row per edge handed over)."""

from __future__ import annotations

import dataclasses
import datetime as dt

from parroles.ledger.file import Ledger


@dataclasses.dataclass(frozen=True)
class Input:
    """One handoff a run received: the needed role, its run, the digest of the output handed over."""

    role: str
    from_run_id: str
    to_run_id: str
    token_id: str
    output_digest: str
    created_at: dt.datetime


_SELECT = """
    SELECT r.role, h.from_run_id::VARCHAR, h.to_run_id::VARCHAR, h.token_id::VARCHAR, h.output_digest, h.created_at
    FROM handoffs h JOIN runs r ON r.run_id = h.from_run_id
"""


def _has_handoffs(ledger: Ledger) -> bool:
    # A ledger only read (never opened for writing by this version) may predate the table.
    rows = ledger.query("SELECT count(*) FROM information_schema.tables WHERE table_name = 'handoffs'")
    return bool(rows[0][0])


def inputs_of(ledger: Ledger, run_id: str) -> list[Input]:
    """What ``run_id`` was handed, in the order of the roles it needs (their positions in the batch)."""
    if not _has_handoffs(ledger):
        return []
    rows = ledger.query(_SELECT + " WHERE h.to_run_id = TRY_CAST(? AS UUID) ORDER BY r.position", [run_id])
    return [Input(*row) for row in rows]


def batch_handoffs(ledger: Ledger, batch_id: str) -> list[Input]:
    """Every handoff between the runs of a batch, by the receiving run's position then the giver's."""
    if not _has_handoffs(ledger):
        return []
    rows = ledger.query(_SELECT + " JOIN runs t ON t.run_id = h.to_run_id WHERE t.parent_run_id = ?"
                        " ORDER BY t.position, r.position", [batch_id])
    return [Input(*row) for row in rows]
