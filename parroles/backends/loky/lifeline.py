"""Runs in loky worker processes and in the Manager process: nothing they start may outlive them or their parent.

A loky worker is a child subreaper (``containment``), leads its own process
group, and watches its parent: after ``kill -9`` of the parent, each helper
sees its parent change and kills all its descendants, then its process
group, then itself.
"""

from __future__ import annotations

import os
import signal

from parroles.backends.containment import watch_parent

POLL_SECONDS = 0.2
# A terminal's Ctrl-C and a supervisor's stop reach the parent's whole process group: the parent's to act on.
GROUP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def lead_own_group() -> None:
    """Become a process-group leader, so processes a role starts in our group die with us."""
    try:
        os.setpgrp()
    except OSError:  # already a group or session leader
        pass


def hold_group_signals() -> None:
    """The parent's half, on the thread that starts workers: block ``GROUP_SIGNALS`` for what it starts.

    A signal mask survives fork and exec, so a worker (and multiprocessing's
    fork server, started by the first forked worker) starts with them held:
    a Ctrl-C or ``kill -TERM -- -PGID`` during its boot no longer kills it,
    and the fork server outlives them, so the parent can cancel its running
    roles instead of losing them with the server (the server's own children
    start unblocked again: ``server_preload``). Call on that thread only.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)


def unblock_group_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


def drop_group_signals() -> None:
    """The worker's half, once it leads its own group: unblock ``GROUP_SIGNALS``, dropping those held meanwhile.

    They were sent to the parent's group while this worker was still in it:
    the parent acts on them (it cancels and stops its workers' roles).
    """
    handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in GROUP_SIGNALS}
    unblock_group_signals()  # a pending ignored signal is discarded
    for signum, handler in handlers.items():
        if handler is not None:
            signal.signal(signum, handler)


def init_manager_process(parent_pid: int) -> None:
    """Initializer of the Manager process: deaf to Ctrl-C, dies with the parent."""
    lead_own_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)
