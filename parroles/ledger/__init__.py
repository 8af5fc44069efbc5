"""The ledger: one DuckDB file, written by the parent alone (``writer``), read by anyone.

``file`` is ``Ledger`` (open, read, the run-ledger contract); ``writer`` the
one thread that writes, through ``journal`` first and ``commit`` then;
``schema`` the tables; ``db`` opening the file; ``query``, ``export`` and
``lineage`` (who handed what to whom) what the command line reads out of it.
"""

from parroles.ledger.file import Ledger, apply_journals

__all__ = ["Ledger", "apply_journals"]
