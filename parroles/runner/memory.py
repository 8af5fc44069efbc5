"""The memory watch: the resident memory of each running role that has a ``memory_limit`` (parent only).

A thread of the parent samples, every ``SAMPLE_SECONDS``, the resident set of
each watched role's worker process and of every process under it (psutil),
and tells the loop once (``MemoryExceeded``) when the sum passes the role's
limit; the batch then has the worker killed (``runner.batch``), so the role
and everything it started end, FAILED with reason ``memory``, and its slot
gets a new worker. Roles running on other workers are not touched.

What it measures: the sum of the resident sets (RSS) of the worker and its
descendants, so the worker's own interpreter (a few tens of MB) counts, and
pages two of them share count twice. What it allows: between two samples a
role may grow past its limit by what it allocates in ``SAMPLE_SECONDS``
(50 ms: at 1 GB/s, about 50 MB), and the kill takes a few ms more. cgroup v2
limits (exact, enforced by the kernel) are not used: they need a cgroup
delegated to the user, which this machine (cgroup v1) does not have.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

SAMPLE_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class MemoryExceeded:
    """What the watch tells the loop: a role's processes held ``rss`` bytes, past its limit."""

    dispatch_id: int
    rss: int


@dataclasses.dataclass
class _Watched:
    pid: int
    limit: int
    told: bool = False


class MemoryWatch:
    """Started at its first ``watch``; ``report`` is called on the watch's thread (it puts into the inbox)."""

    def __init__(self, report: Callable[[MemoryExceeded], None], interval: float = SAMPLE_SECONDS) -> None:
        self._report = report
        self._interval = interval
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set to stop the thread
        self._thread: threading.Thread | None = None

    def watch(self, dispatch_id: int, pid: int, limit: int) -> None:
        with self._lock:
            self._watched[dispatch_id] = _Watched(pid, limit)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="parroles-memory-watch", daemon=True)
                self._thread.start()

    def forget(self, dispatch_id: int) -> None:
        with self._lock:
            self._watched.pop(dispatch_id, None)

    def close(self) -> None:
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._wake.wait(self._interval):
            with self._lock:
                watched = list(self._watched.items())
            for dispatch_id, entry in watched:
                rss = tree_rss(entry.pid)
                if rss > entry.limit and not entry.told:
                    entry.told = True
                    self._report(MemoryExceeded(dispatch_id, rss))


def tree_rss(pid: int) -> int:
    """The resident memory of process ``pid`` and every process under it, in bytes (0 once it is gone)."""
    import psutil  # here: a batch without a memory_limit never pays for its import

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:  # it ended between the listing and the look
            pass
    return total
