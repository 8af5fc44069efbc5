"""The process tree under a worker: who is alive, and how to end every descendant.

Used on both sides. The parent uses it on a worker (to stop a role whose
grace ran out, and at a batch's end for what its roles left running); a
worker uses it on itself (``containment``), so it imports nothing but psutil,
and that only when there is something to kill. Workers are child subreapers
(``containment.become_subreaper``): whatever a role started, in whatever session
or process group it moved to, stays a descendant of its worker while the
worker lives, so walking the tree finds it.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

MAX_ROUNDS = 50  # listings of the tree before giving up on a role that forks faster than it is killed
EXIT_WAIT = 0.5  # seconds one round waits for the processes it killed to exit


def alive(pid: int) -> bool:
    return _living(pid) is not None


def outlives(pid: int, timeout: float) -> bool:
    """True if process ``pid`` is still alive ``timeout`` seconds from now.

    A process on its way out (its files closed, not yet a zombie) says
    "alive" to a single look; it is a zombie within milliseconds, so only a
    process that really lives on is waited for the whole ``timeout``.
    """
    if not alive(pid):
        return False
    _wait_exit([pid], timeout)
    return alive(pid)


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (its identity, with the pid), or None if there is no such process alive."""
    import psutil

    process = _living(pid)
    try:
        return process.create_time() if process is not None else None
    except psutil.Error:
        return None


def _living(pid: int) -> psutil.Process | None:
    """Process ``pid`` if it runs; None if there is none, or only its zombie (it has exited)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process if process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else None
    except psutil.Error:
        return None


def kill_tree(root: int, *, include_root: bool, reap: Callable[[], None] | None = None) -> bool:
    """SIGKILL every living descendant of ``root`` (and ``root`` too if ``include_root``); True once none is left.

    A root that is to die is stopped first (SIGSTOP), so it starts nothing
    new meanwhile. Each round lists the descendants, stops them all (a stopped
    process cannot fork), kills them and waits for them to exit; one forked
    between a listing and its stop is found by the next round. Zombies count
    as gone; ``reap`` (a subreaper's own ``wait``) runs after each round.
    """
    if include_root:
        _signal(root, signal.SIGSTOP)
    done = False
    for _ in range(MAX_ROUNDS):
        living = _living_descendants(root)
        if not living:
            done = True
            break
        for process in living:
            _signal(process.pid, signal.SIGSTOP)
        for process in living:
            _signal(process.pid, signal.SIGKILL)
        _wait_exit([process.pid for process in living], EXIT_WAIT)
        if reap is not None:
            reap()
    if include_root:
        _signal(root, signal.SIGKILL)
    return done


def kill_descendants(pids: set[int]) -> None:
    """Kill what roles left running under these workers, which live on (kept for the next batch)."""
    for pid in pids:
        if may_have_children(pid):
            kill_tree(pid, include_root=False)


def may_have_children(pid: int) -> bool:
    """False only when Linux says so; asking costs a few file reads, a full process scan ~2-10 ms."""
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
    """SIGKILL the process group a worker leads (itself and what its role started in that group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _living_descendants(root: int) -> list[psutil.Process]:
    if not may_have_children(root):
        return []
    import psutil

    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    living = []
    for process in descendants:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                living.append(process)
        except psutil.Error:
            pass
    return living


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exit(pids: list[int], timeout: float) -> None:
    """Block until these processes have exited (zombies have), or ``timeout`` passes.

    A pidfd turns readable when its process exits, so this waits on the
    kernel rather than polling; without pidfds (not Linux 5.3+) it polls.
    """
    deadline = time.monotonic() + timeout
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except (AttributeError, OSError):
                pass  # gone already, or no pidfds here
        for fd in fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return
        if len(fds) < len(pids) and not hasattr(os, "pidfd_open"):
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        for fd in fds:
            os.close(fd)
