"""What a role cost, measured in its worker: CPU time (its worker's and its children's) and peak memory.

Runs in worker processes. CPU time is ``getrusage`` before and after the
role: the worker process's own (all its threads) and that of the child
processes it waited for. A child the role left running is counted when the
worker reaps it: in the role running then, or in none if it is reaped
between roles. The peak is the worker's resident
memory at its highest during the role: on Linux its high-water mark is reset
as the role starts (``/proc/self/clear_refs``) and read as it ends (``VmHWM``
in ``/proc/self/status``); a child's
peak counts when it exceeds every earlier child's (``RUSAGE_CHILDREN`` keeps
only the largest). Elsewhere the worker's peak since it started is what is
known. About 10 microseconds a role (the files stay open; reading the peak is most of it).

On a Dask worker that runs several roles at once in threads, the process's
CPU time and peak are shared by the roles running together: give each role a
worker of its own (``--nthreads 1``) for exact figures.
"""

from __future__ import annotations

import os
import resource
import sys

from parroles.results import Cost

_LINUX = sys.platform.startswith("linux")
_KIB = 1024 if _LINUX else 1  # ru_maxrss is KiB on Linux, bytes on macOS


class Meter:
    """Started as a role starts; ``cost()`` as it ends."""

    def __init__(self) -> None:
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        if _LINUX:
            _reset_peak()

    def cost(self) -> Cost:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        user = own.ru_utime - self._self.ru_utime + children.ru_utime - self._children.ru_utime
        system = own.ru_stime - self._self.ru_stime + children.ru_stime - self._children.ru_stime
        peak = _peak(own)
        if children.ru_maxrss > self._children.ru_maxrss:  # a child of this role outgrew every earlier one
            peak = max(peak, children.ru_maxrss * _KIB)
        return Cost(round(user * 1000, 3), round(system * 1000, 3), peak)


class _Procfs:
    """This process's ``clear_refs`` and ``status``, opened once (a pid of its own: a fork opens them anew)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.clear_refs = _open("/proc/self/clear_refs", os.O_WRONLY)
        self.status = _open("/proc/self/status", os.O_RDONLY)


_procfs: _Procfs | None = None


def _files() -> _Procfs:
    global _procfs
    if _procfs is None or _procfs.pid != os.getpid():
        _procfs = _Procfs()
    return _procfs


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError:  # no procfs (a sandbox): the peak since the worker started is what is known
        return None


def _reset_peak() -> None:
    fd = _files().clear_refs
    if fd is not None:
        try:
            os.write(fd, b"5")  # 5: reset the peak resident set size (proc(5))
        except OSError:
            pass


def _peak(own: resource.struct_rusage) -> int:
    """The process's peak resident memory since the reset (``VmHWM``), in bytes.

    Not ``ru_maxrss``: that also keeps the peak of the process an ``exec`` replaced, so a worker started
    from a large parent would report the parent's peak for every role (measured). Without procfs,
    ``ru_maxrss`` is what is known.
    """
    fd = _files().status if _LINUX else None
    if fd is not None:
        try:
            data = os.pread(fd, 4096, 0)  # procfs writes the file anew at each read from its start
            start = data.index(b"VmHWM:") + 6
            return int(data[start:data.index(b"kB", start)]) * 1024
        except (OSError, ValueError):
            pass
    return own.ru_maxrss * _KIB
