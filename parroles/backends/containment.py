"""Runs in worker processes (any backend's): what a role starts ends with it, wherever it moved.

A worker is a child subreaper (Linux): a process its role started that
leaves the worker's process group or session (``start_new_session``,
``setsid``, a double fork) is re-parented to the worker when its own parent
exits, not to init, so the worker can still find and kill it
(``end_descendants``), and ``wait`` for it (``reap_zombies``). The backends
decide when: loky when a stopped role ends and when a batch is over, Dask when
a role ends and no other role runs in that worker process.
"""

from __future__ import annotations

import ctypes
import os
import sys

from parroles.backends.process_tree import kill_tree

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux >= 3.4); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_zombies() -> None:
    """``wait`` for every child that has exited: a subreaper inherits orphans, and must reap them.

    Called when no role runs (between roles, at a batch's end), so it never
    takes the exit status of a child a running role is about to wait for.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def end_descendants() -> bool:
    """Kill every process under this one, whatever group or session it moved to, and reap them."""
    return kill_tree(os.getpid(), include_root=False, reap=reap_zombies)
