"""Thread caps: a worker's numeric libraries never use more threads than its share of the CPUs.

Runs in worker processes. On a machine with C cores and W workers, each BLAS
or OpenMP library would otherwise start C threads in every worker: C x W
threads fighting over C cores. As joblib does, a loky worker starts with each
variable of ``THREAD_VARIABLES`` set to ``max(C // W, 1)`` (C as loky counts
it: the CPUs the process may use, a cgroup's quota included), except the ones
the user set. A role's own ``threads`` applies for that role alone: the
variables (for the processes it starts and the libraries it loads) and
``threadpoolctl`` (for the libraries already loaded, even in a reused worker).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS", "POLARS_MAX_THREADS",
                    "RAYON_NUM_THREADS")
_worker_cap: int | None = None  # what this worker's roles run under when they ask for nothing


def cap_for(workers: int) -> int:
    """The threads each of ``workers`` workers gets: the CPUs this process may use, shared."""
    from loky import cpu_count

    cpus: int = cpu_count()
    return max(cpus // max(workers, 1), 1)


def cap_this_worker(workers: int) -> None:
    """At a worker's start: set each variable the user did not set to this worker's share."""
    global _worker_cap
    cap = cap_for(workers)
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(cap))
    given = os.environ["OMP_NUM_THREADS"]
    _worker_cap = int(given) if given.isdigit() else None


@contextlib.contextmanager
def role_threads(threads: int | None) -> Iterator[int | None]:
    """Run a role under its own cap, if it has one; yields the cap it runs under (None: none known).

    Afterwards each library loaded before the role gets back the threads it had (its own variable's, or
    what the user set), and one the role loaded gets the worker's cap.
    """
    if threads is None:
        yield _worker_cap
        return
    from threadpoolctl import ThreadpoolController

    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    controller = ThreadpoolController()
    known = {library.filepath for library in controller.lib_controllers}
    try:
        with controller.limit(limits=threads):  # restores what it found, library by library
            yield threads
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if _worker_cap is not None:
            for library in ThreadpoolController().lib_controllers:
                if library.filepath not in known:  # loaded by the role, under its cap
                    library.set_num_threads(_worker_cap)
