"""Role functions the tests run in worker processes (importable by workers by name)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import parroles
from parroles import Code, Fix, Plan, Review, RoleCancelled, TestReport
from parroles.roles import content_digest

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


class UnpicklableError(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("this exception refuses to be pickled")


def role_modules(role: Any, run_id: str) -> list[str]:
    return sorted(name for name in ("duckdb", "pyarrow", "parroles.ledger", "parroles.ledger_writer") if name in sys.modules)


def cancelled_then_return(role: Any, run_id: str) -> str:
    """Fails if named 'fail'; others wait for the cancel signal, then either stop or finish their work."""
    ctx = parroles.context()
    if str(role) == "fail":
        time.sleep(0.2)
        raise ValueError("planned failure")
    while not ctx.cancelled():
        time.sleep(0.01)
    if str(role) == "finisher":
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


def manager_killer(role: Any, run_id: str) -> str:
    name = str(role)
    if name == "killer":
        time.sleep(0.3)
        killed = kill_the_manager()
        # Return only once this worker has seen the channel go, so the roles
        # queued behind it cannot start first.
        ctx, deadline = parroles.context(), time.monotonic() + 10
        while not ctx.cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"killed {killed}"
    return crash_table(role, run_id)
