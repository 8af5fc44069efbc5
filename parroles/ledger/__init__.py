"""The ledger: one DuckDB file, written by the parent alone (``writer``), read by anyone.

``file`` is ``Ledger`` (open, read, the run-ledger contract); ``writer`` the
one thread that writes, through ``journal`` first and ``commit`` then;
``schema`` the tables; ``db`` opening the file; ``query``, ``export`` and
``lineage`` (who handed what to whom) what the command line reads out of it.

``Ledger`` and ``apply_journals`` are imported on first use, so that reading
``schema`` (the command line's help does) does not load duckdb.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Ledger", "apply_journals", "journals_to_apply"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'parroles.ledger' has no attribute {name!r}")
    from parroles.ledger import file

    return getattr(file, name)


if TYPE_CHECKING:
    from parroles.ledger.file import Ledger, apply_journals, journals_to_apply
