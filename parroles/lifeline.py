"""Keep helper processes from outliving the parent that started them.

Used in worker processes and in the Manager process. After ``kill -9`` of the
parent, its children are re-parented and would run on for good; each one
leads its own process group and kills that group when its parent changes.
"""

from __future__ import annotations

import os
import signal
import threading

POLL_SECONDS = 0.2


def lead_own_group() -> None:
    """Become a process-group leader, so processes a role starts die with us."""
    try:
        os.setpgrp()
    except OSError:  # already a group or session leader
        pass


def kill_own_group() -> None:
    """Kill this process and everything left in its process group."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(1)


def watch_parent(parent_pid: int) -> None:
    """Start a daemon thread that kills our group once ``parent_pid`` is no longer our parent."""

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_SECONDS):
            if os.getppid() != parent_pid:
                kill_own_group()

    threading.Thread(target=watch, name="parroles-lifeline", daemon=True).start()


def init_manager_process(parent_pid: int) -> None:
    """Initializer of the Manager process: deaf to Ctrl-C, dies with the parent."""
    lead_own_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)
