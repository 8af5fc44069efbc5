"""A batch to look at: one offline HTML file (``write_report``), and two batches compared (``diff_batches``).

``data`` reads a batch from the ledger, ``layout`` places the timeline's lanes and the graph's layers
(pure functions), ``drawing`` turns them into shapes, ``diff`` compares two batches, ``html`` renders the
template. What ``parroles report`` and ``parroles diff`` do, as functions.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parroles.ledger import Ledger
    from parroles.report.diff import BatchDiff

__all__ = ["default_report_path", "diff_batches", "write_report"]


def default_report_path(batch_id: str) -> Path:
    return Path(f"parroles-report-{batch_id}.html")


def write_report(ledger: str | os.PathLike[str] | Ledger, batch: str, out: str | os.PathLike[str] | None = None,
                 against: str | None = None) -> Path:
    """Write the report of ``batch`` (its id or the start of it) to ``out`` (default
    ``parroles-report-<batch id>.html``), with ``against``: how it compares with that batch. Returns the path.

    RunNotFoundError (exit 4) for an unknown batch; ConfigError (exit 2) when the file cannot be written.
    """
    from parroles.report import data, diff, html

    with _opened(ledger) as opened:
        view = data.read_batch(opened, batch)
        compared = diff.compare(data.read_batch(opened, against), view) if against is not None else None
    return html.write_atomically(out or default_report_path(view.batch.batch_id), html.render(view, compared))


def diff_batches(ledger: str | os.PathLike[str] | Ledger, a: str, b: str) -> BatchDiff:
    """Batch ``a`` against batch ``b`` (ids or their starts), role by role."""
    from parroles.report import data, diff

    with _opened(ledger) as opened:
        return diff.compare(data.read_batch(opened, a), data.read_batch(opened, b))


def _opened(ledger: str | os.PathLike[str] | Ledger) -> contextlib.AbstractContextManager[Ledger]:
    """The ledger given (left open), or the file at that path opened read-only (closed with the ``with``)."""
    from parroles.ledger import Ledger

    return contextlib.nullcontext(ledger) if isinstance(ledger, Ledger) else Ledger(ledger, read_only=True)
