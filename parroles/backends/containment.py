"""Runs in worker processes (any backend's): what a role starts ends with it, wherever it moved.

A worker is a child subreaper (Linux): a process its role started that
leaves the worker's process group or session (``start_new_session``,
``setsid``, a double fork) is re-parented to the worker when its own parent
exits, not to init, so the worker can still find and kill it
(``end_descendants``), and ``wait`` for it (``reap_zombies``). The backends
decide when: loky when a stopped role ends and when a batch is over, Dask when
a role ends and no other role runs in that worker process. After ``kill -9``
of the parent, a worker that watches it (``watch_parent``) kills all its
descendants, then its process group, then itself.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading

from parroles.backends.process_tree import kill_tree, started_at

POLL_SECONDS = 0.2  # how often the parent is looked at where no pidfd can be waited on

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

_subreaper = False


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux >= 3.4); False where it cannot."""
    global _subreaper
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _subreaper = bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
    return _subreaper


def may_have_descendants() -> bool:
    """Whether a process this one started may still run, without waiting for or reaping any.

    In a subreaper every descendant still alive is a child or under one (an
    orphan re-parents here), so no child at all means no descendant; elsewhere
    an orphan may live on under init, unseen. A child that exited and is not
    reaped yet counts too (``WNOWAIT`` leaves it for whoever waits for it).
    """
    if not _subreaper:
        return True
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True  # a child runs, or exited and waits to be reaped


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


def end_all() -> None:
    """Kill everything under this process and in its group, then exit."""
    try:
        end_descendants()
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def watch_parent(parent_pid: int) -> None:
    """Start a daemon thread that ends us and all we started once the process ``parent_pid`` has exited.

    That is our parent process, or, for a worker forked from multiprocessing's
    fork server, the process that asked the server for us (the server is our
    parent then). It is identified by its pid and, when it is not our parent,
    its start time read now, while it waits for us: a pid used again later is
    not mistaken for it.
    """
    is_parent = os.getppid() == parent_pid
    started = None if is_parent else started_at(parent_pid)

    def alive() -> bool:
        if is_parent:
            return os.getppid() == parent_pid
        return started is not None and started_at(parent_pid) == started

    def watch() -> None:
        try:
            parent = os.pidfd_open(parent_pid)  # readable once the parent exits: no polling
        except (AttributeError, OSError):
            parent = None
        if parent is not None and alive():
            select.select([parent], [], [])
        else:  # no pidfds here (or the parent is gone already): poll
            stop = threading.Event()
            while alive():
                stop.wait(POLL_SECONDS)
        end_all()

    threading.Thread(target=watch, name="parroles-lifeline", daemon=True).start()
