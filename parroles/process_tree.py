"""The process tree under the workers, seen from the parent: who is alive, and what to kill.

Workers lead their own process groups (``lifeline``), so a group kill takes
whatever a role started with them. Workers kept for the next batch are not
killed; what their roles left running under them is.
"""

from __future__ import annotations

import os
import signal

import psutil


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_descendants(pids: set[int]) -> None:
    """SIGKILL what the roles of a finished batch left running under these (kept) workers."""
    for pid in pids:
        if not may_have_children(pid):
            continue
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


def may_have_children(pid: int) -> bool:
    """False only when Linux says so; asking costs a few file reads, a full process scan ~10 ms."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # no procfs: ask psutil
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", "rb") as listing:
                if listing.read().strip():
                    return True
        except FileNotFoundError:
            if task == str(pid):
                return True  # a kernel without the children file
        except OSError:
            pass
    return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group a worker leads (itself and what its role started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

