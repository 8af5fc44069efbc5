"""Waiting in tests: every wait polls a real condition and has a bound, so a hang fails instead of stalling."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from parroles import Ledger

WAIT = 60.0  # the bound of every wait for another process's state
HERE = Path(__file__).parent
M = TypeVar("M")


def wait_until(predicate: Callable[[], object], timeout: float = WAIT, *, what: str = "the condition",
               interval: float = 0.02) -> None:
    """Return once ``predicate()`` is true; AssertionError if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def next_of(inbox: queue.Queue[Any], kind: type[M] | tuple[type[M], ...], timeout: float = WAIT) -> M:
    """The next message of class ``kind`` (or of one of them) a backend put in ``inbox``, others passed over;
    AssertionError if none comes within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {kind} in the inbox") from None
        if isinstance(message, kind):
            return message


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def still_running(pids: Iterable[int], within: float = 10.0) -> list[int]:
    """The pids still running once ``within`` seconds have passed (or at once, when none is)."""
    alive = list(pids)
    deadline = time.monotonic() + within
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if running(pid)]
    return alive


def runs_with_status(ledger_path: Path, status: str) -> int:
    """How many runs another process's ledger shows in ``status`` (0 while it cannot be read yet)."""
    if not ledger_path.exists():
        return 0
    try:
        with Ledger(ledger_path, read_only=True, busy_timeout=1) as ledger:
            return len(ledger.list_runs(status=status))
    except Exception:  # not a ledger yet, or busy for a moment
        return 0


def child_pids(ledger_path: Path, run_ids: list[str]) -> list[int]:
    """The pids roles reported in their "child" events (processes they started)."""
    with Ledger(ledger_path) as ledger:
        return [e.payload["pid"] for run_id in run_ids for e in ledger.get_events(run_id) if e.kind == "child"]


def start_parent(ledger_path: Path, batch_id: str, roles: list[str], executor: str = "crash_table",
                 **config: object) -> subprocess.Popen[str]:
    """A parent process running one batch (``parent_script.py``), for tests that signal or kill it."""
    return subprocess.Popen([sys.executable, str(HERE / "parent_script.py"), str(ledger_path), batch_id,
                             ",".join(roles), json.dumps(config), executor], stdout=subprocess.PIPE, text=True)


def wait_for_running(ledger_path: Path, batch_id: str, count: int, events: int = 0) -> list[str]:
    """Wait (bounded) until ``count`` runs are RUNNING and ``events`` events of theirs are stored."""
    found: list[str] = []

    def ready() -> bool:
        try:
            with Ledger(ledger_path, read_only=True, busy_timeout=1) as ledger:
                running_ids = [r.run_id for r in ledger.list_runs(batch_id) if r.status.value == "RUNNING"]
                stored = sum(len(ledger.get_events(run_id)) for run_id in running_ids)
        except Exception:  # not there yet, or busy for a moment
            return False
        found[:] = running_ids
        return len(running_ids) >= count and stored >= events

    wait_until(ready, what=f"{count} runs of {batch_id} RUNNING")
    return found


def fork_server_pid() -> int:
    """This process's multiprocessing fork server, found by its command line (not the stdlib's private state)."""
    for child in psutil.Process().children():
        try:
            if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError("no fork server is running")
