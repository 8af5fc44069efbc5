"""Role functions the tests run in worker processes (importable by workers by name)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import parroles
from parroles import Code, Fix, Plan, Review, RoleCancelled, TestReport
from parroles.digests import content_digest

DIGEST = content_digest(b"patch")
TYPED_OUTPUTS = {
    "planner": Plan(["split", "build"], 2, ["/spec/tasks"]),
    "coder": Code(DIGEST, ["a.py", "b.py"], notes="done"),
    "reviewer": Review(True, ["fine"], False),
    "tester": TestReport(False, 10, ["test_x"], DIGEST),
    "fixer": Fix(DIGEST, ["test_x"]),
}


def typed_output(role: Any, run_id: str) -> Any:
    return TYPED_OUTPUTS[str(role)]


def echo(role: Any, run_id: str) -> dict[str, Any]:
    return {"role": str(role), "run_id": run_id, "pid": os.getpid()}


def fail_if_named_fail(role: Any, run_id: str) -> str:
    if str(role).startswith("fail"):
        raise ValueError(f"{role} refused")
    return f"{role} ok"


def always_fail(role: Any, run_id: str) -> None:
    raise RuntimeError(f"{role} broke")


def sleep_by_name(role: Any, run_id: str) -> str:
    """Roles named like 'sleep-0.3' sleep that many seconds."""
    time.sleep(float(str(role).split("-")[1]))
    return str(role)


def emit_many(role: Any, run_id: str) -> int:
    ctx = parroles.context()
    for i in range(50):
        ctx.emit("step", {"i": i, "role": str(role)})
    return 50


def start_child(kind: str = "sleep") -> int:
    """Start `sleep 300` and report its pid as an event; the test checks it died."""
    child = subprocess.Popen(["sleep", "300"])
    parroles.context().emit("child", {"pid": child.pid})
    return child.pid


def crash_table(role: Any, run_id: str) -> str:
    """Behaviour by role name: the crash cases of the fault-tolerance suite."""
    name = str(role)
    if name == "exit":
        os._exit(1)
    if name == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "segfault":
        ctypes.string_at(0)
    if name == "systemexit":
        raise SystemExit(3)
    if name == "keyboardinterrupt":
        raise KeyboardInterrupt
    if name == "unpicklable-exception":
        raise UnpicklableError("cannot travel as a pickle")
    if name == "unpicklable-return":
        return threading.Lock()  # type: ignore[return-value]
    if name.startswith("child-then-"):
        start_child()
        return crash_table(name.removeprefix("child-then-"), run_id)
    if name == "forever":
        while True:
            time.sleep(0.05)
    if name == "polite":
        ctx = parroles.context()
        while not ctx.cancelled():
            time.sleep(0.01)
        ctx.check_cancelled()
    if name == "slow":
        time.sleep(1.0)
    if name == "late-exit":
        time.sleep(0.3)
        os._exit(1)
    if name == "fail":
        time.sleep(0.2)
        raise ValueError("planned failure")
    return f"{name} done"


class FailOnceChildStarted:
    """'child-then-forever' starts a child, marks that in ``folder``, then runs on; 'fail' fails once the mark is
    there (at most 30 s later), so fail-fast always finds a role with a child to stop, however slowly workers start."""

    def __init__(self, folder: str) -> None:
        self.mark = os.path.join(folder, "child-started")

    def __call__(self, role: Any, run_id: str) -> str:
        if str(role) == "child-then-forever":
            start_child()
            open(self.mark, "w").close()
            return crash_table("forever", run_id)
        if str(role) == "fail":
            deadline = time.monotonic() + 30
            while not os.path.exists(self.mark) and time.monotonic() < deadline:
                time.sleep(0.01)
        return crash_table(role, run_id)


class UnpicklableError(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


def role_modules(role: Any, run_id: str) -> list[str]:
    return sorted(name for name in ("duckdb", "pyarrow", "parroles.ledger", "parroles.ledger.writer") if name in sys.modules)


class CancelledThenReturn:
    """'fail' fails once the roles named in ``started`` run (each marks its start in ``folder``; at most 30 s);
    the others wait for the cancel signal, then 'finisher' finishes its work anyway and the rest stop."""

    def __init__(self, folder: str | os.PathLike[str], started: tuple[str, ...]) -> None:
        self.folder, self.started = str(folder), started

    def __call__(self, role: Any, run_id: str) -> str:
        ctx, name = parroles.context(), str(role)
        if name == "fail":
            deadline = time.monotonic() + 30
            while not all(os.path.exists(os.path.join(self.folder, f"started-{other}")) for other in self.started):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.started} never started beside 'fail'")
                time.sleep(0.01)
            raise ValueError("planned failure")
        open(os.path.join(self.folder, f"started-{name}"), "w").close()
        while not ctx.cancelled():
            time.sleep(0.01)
        if name == "finisher":
            return "finished anyway"
        raise RoleCancelled("stopping as asked")


def kill_the_manager() -> int:
    """Find the batch's Manager (a fork of the parent, same command line) and kill it."""
    import psutil

    parent = psutil.Process(os.getppid())
    for child in parent.children():
        if child.cmdline() == parent.cmdline():
            child.kill()
            return child.pid
    raise RuntimeError("no Manager process found")


class ManagerKiller:
    """'killer' kills the batch's Manager once 'polite' and 'forever' run (each marks its start in ``folder``),
    so that the Manager dies under running roles; the other roles behave as crash_table's."""

    RUNNING = ("polite", "forever")

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = str(folder)

    def __call__(self, role: Any, run_id: str) -> str:
        name = str(role)
        if name in self.RUNNING:
            open(os.path.join(self.folder, f"started-{name}"), "w").close()
        if name != "killer":
            return crash_table(role, run_id)
        marks = [os.path.join(self.folder, f"started-{other}") for other in self.RUNNING]
        _wait_until(lambda: all(map(os.path.exists, marks)), f"{self.RUNNING} to start beside 'killer'")
        killed = kill_the_manager()
        # Return only once this worker has seen the channel go, so the roles
        # queued behind it cannot start first.
        ctx, deadline = parroles.context(), time.monotonic() + 10
        while not ctx.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"killed {killed}"


# -- one failure domain per role, and containment (issue 11) ---------------------------------

WAIT_SECONDS = 60.0  # bound of every wait a test role makes for another process


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _reaped(pid: int) -> bool:
    import psutil

    return not psutil.pid_exists(pid)


def _wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.02)


def double_fork() -> int:
    """A grandchild in a session of its own, orphaned at once; returns its pid.

    Without a subreaper it would be re-parented to init. It stays in Python
    (no exec), so it holds every descriptor the worker had: the channel,
    loky's pipes, the resource tracker's.
    """
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read)
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                os.close(write)
                while True:
                    time.sleep(1)
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        return int(pipe.read())


def start_escapees() -> list[int]:
    """Start a child in a new session, one in a new process group and a double-forked one; report their pids."""
    pids = [subprocess.Popen(["sleep", "300"], start_new_session=True).pid,
            subprocess.Popen(["sleep", "300"], process_group=0).pid,
            double_fork()]
    ctx = parroles.context()
    for pid in pids:
        ctx.emit("child", {"pid": pid})
    return pids


def escape_table(role: Any, run_id: str) -> Any:
    """'escape-then-X': start escapees, then behave as crash_table's X; 'helpers': report the parent's helpers."""
    name = str(role)
    if name.startswith("escape-then-"):
        start_escapees()
        return crash_table(name.removeprefix("escape-then-"), run_id)
    if name == "helpers":  # every process under the parent: workers, Manager, loky's resource tracker
        import psutil

        # The parent script, not the worker's parent process: that is the fork server, for forked workers.
        parent = next(p for p in psutil.Process().parents() if "parent_script.py" in " ".join(p.cmdline()))
        pids = [p.pid for p in parent.children(recursive=True)]
        parroles.context().emit("helpers", {"pids": pids})
        return pids
    return crash_table(role, run_id)


class Marked:
    """A role executor for one test's directory: each role marks its every start with a file of its own.

    'sibling' emits 3 events, waits until a worker of another role has died
    (one announced by a 'dying-PID' file) and its pool has reaped it, runs on
    a little, emits 3 more and completes: it ran right through the other's
    death. 'exit', 'sigkill', 'segfault'
    announce themselves and crash once the sibling runs; 'deaf' ignores
    SIGTERM and never polls cancelled(); 'crash-now' exits at once,
    'segfault-now' segfaults its worker at once; any other role just completes.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, role: Any, run_id: str) -> str:
        name = str(role)
        with open(os.path.join(self.directory, f"start-{name}-{run_id}-{time.time_ns()}"), "x"):
            pass
        if name == "sibling":
            return self._sibling()
        if name == "crash-now":
            os._exit(1)
        if name == "segfault-now":
            ctypes.string_at(0)
        if name in ("exit", "sigkill", "segfault", "deaf"):
            _wait_until(lambda: self._files("start-sibling-"), "the sibling to start")
            with open(os.path.join(self.directory, f"dying-{os.getpid()}"), "x"):
                pass
            if name == "deaf":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                while True:
                    time.sleep(0.05)
            return crash_table(name, run_id)
        return f"{name} done"

    def _sibling(self) -> str:
        ctx = parroles.context()
        for i in range(3):
            ctx.emit("tick", {"i": i})
        _wait_until(lambda: self._files("dying-"), "another role to announce its death")
        dying = int(self._files("dying-")[0].removeprefix("dying-"))
        _wait_until(lambda: _reaped(dying), f"worker {dying} to die and be reaped by its pool")
        time.sleep(0.5)  # a pool that tears down every worker on a death takes this one meanwhile
        for i in range(3, 6):
            ctx.emit("tick", {"i": i})
        return "sibling done"

    def _files(self, prefix: str) -> list[str]:
        return [f for f in os.listdir(self.directory) if f.startswith(prefix)]


class Watcher:
    """A role executor: 'escape-then-X' as escape_table, and 'watch', which completes once every
    child the escaper reported (in a file) is gone: proof that they ended while the batch still ran."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def __call__(self, role: Any, run_id: str) -> Any:
        name = str(role)
        if name.startswith("escape-then-"):
            pids = start_escapees()
            path = os.path.join(self.directory, "children.json")
            with open(path + ".tmp", "w") as out:
                json.dump(pids, out)
            os.rename(path + ".tmp", path)
            return crash_table(name.removeprefix("escape-then-"), run_id)
        if name == "fail-after-escape":  # once the escapees and the watcher run
            for file in ("children.json", "watching"):
                _wait_until(lambda f=file: os.path.exists(os.path.join(self.directory, f)), f"{file} to appear")
            raise ValueError("planned failure")
        if name == "watch":
            with open(os.path.join(self.directory, "watching"), "x"):
                pass
            path = os.path.join(self.directory, "children.json")
            _wait_until(lambda: os.path.exists(path), "the escaper's children")
            with open(path) as source:
                pids = json.load(source)
            _wait_until(lambda: all(_gone(pid) for pid in pids), f"children {pids} to end")
            return pids
        return crash_table(role, run_id)
