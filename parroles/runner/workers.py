"""Workers started ahead of a batch (``start_workers``).

Kept apart from ``execute`` and light on purpose: ``parroles run`` imports it
right after reading the spec, so that the workers boot while the rest of the
runner, the ledger and duckdb load in the parent.
"""

from __future__ import annotations

from parroles import backends
from parroles.config import ParallelRoleConfig
from parroles.errors import ConfigError


def start_workers(workers: int, config: ParallelRoleConfig | None = None) -> None:
    """Start ``workers`` worker processes now, ahead of this process's next batch.

    They boot while the caller goes on (loading a spec, importing modules,
    opening the ledger); the next batch that runs ``workers`` roles at once
    (``config.workers_for(number of roles)``) takes them, as it takes the
    workers an earlier batch left idle. Unused, they stop after
    ``config.idle_worker_timeout`` seconds (at least a minute), at exit, or on
    ``shutdown_workers()``. Does nothing for the dask backend.
    """
    config = config if config is not None else ParallelRoleConfig()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive int, got {workers!r}")
    backends.backend_class(config.backend).start_workers(workers, config.backend_options())
