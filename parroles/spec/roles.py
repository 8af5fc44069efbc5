"""Runs in worker processes: the role executor of a spec file.

It travels to the workers as a few strings (module and attribute names,
commands, parameters) and imports each role's function there, so a spec's
functions never need to be pickled.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from parroles.errors import CommandFailed, RoleCancelled
from parroles.role_context import context

TAIL_LINES = 20
POLL_SECONDS = 0.05
READ_AFTER_EXIT = 1.0  # seconds the program's last lines are awaited once it exited


@dataclasses.dataclass(frozen=True)
class SpecRole:
    name: str
    call: str | None  # "module:function"
    command: tuple[str, ...] | None
    params: Mapping[str, Any]
    timeout: float | None
    needs: tuple[str, ...] = ()  # names of the roles it needs, matrix roles already expanded
    matrix_of: str | None = None  # the [[roles]] table a matrix expansion came from
    on_failed_needs: str = "cancel"
    retries: int | None = None
    retry_on: tuple[str, ...] | None = None
    version: str | None = None
    inputs: tuple[str, ...] = ()  # file patterns, absolute (the spec's folder joined to what it says)
    threads: int | None = None
    memory_limit: int | None = None

    def function(self) -> Callable[..., Any] | None:
        """What its workers call, with ``params`` as keyword arguments (None for a role with problems)."""
        if self.command is not None:
            return SpecCommand(self.command)
        return SpecCall(self.call) if self.call is not None else None


@dataclasses.dataclass(frozen=True)
class SpecCall:
    """A ``call`` role's function, named ``module:function``: imported in the worker, never pickled."""

    call: str

    def __call__(self, **params: Any) -> Any:
        return self.target()(**params)

    def target(self) -> Callable[..., Any]:
        module_name, _, attribute = self.call.partition(":")
        target: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        return target

    def parroles_key_code(self) -> Callable[..., Any]:
        """What its cache key digests: the function it names (``cache.keys.KEY_CODE``), not this wrapper."""
        return self.target()


@dataclasses.dataclass(frozen=True)
class SpecCommand:
    """A ``command`` role: its program run with ``run_command``."""

    argv: tuple[str, ...]

    def __call__(self) -> dict[str, Any]:
        return run_command(self.argv)

    def parroles_key_code(self) -> dict[str, Any]:
        """What its cache key holds of it: its argv (``cache.keys.KEY_CODE``)."""
        return {"command": list(self.argv)}


def run_command(argv: Sequence[str]) -> dict[str, Any]:
    """Run a program in this worker's process group; stop it when the role is told to stop."""
    ctx = context()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    tails: dict[str, collections.deque[str]] = {"stdout": collections.deque(maxlen=TAIL_LINES),
                                                "stderr": collections.deque(maxlen=TAIL_LINES)}
    echoes = {"stdout": sys.stdout, "stderr": sys.stderr}
    ended = threading.Event()
    readers = [threading.Thread(target=_drain, args=(getattr(proc, name), tails[name], echoes[name], ended),
                                daemon=True)
               for name in tails]
    for reader in readers:
        reader.start()
    while True:
        try:
            code = proc.wait(timeout=POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if ctx.cancelled():
                proc.kill()
                proc.wait()
                raise RoleCancelled(f"command {argv[0]!r} stopped: the role was cancelled") from None
    for reader in readers:  # a background child may hold the pipes open for good: bounded
        reader.join(READ_AFTER_EXIT)
    ended.set()
    stdout_tail, stderr_tail = list(tails["stdout"]), list(tails["stderr"])
    result = {"exit_code": code, "stdout_tail": stdout_tail, "stderr_tail": stderr_tail}
    if code != 0:
        last = "\n".join(stderr_tail[-5:] or stdout_tail[-5:])
        raise CommandFailed(f"command {' '.join(argv)!r} exited with code {code}" + (f":\n{last}" if last else ""),
                            returncode=code)
    return result


def _drain(stream: Any, tail: collections.deque[str], echo: Any, ended: threading.Event) -> None:
    """Keep the last lines for the output; pass every line on to the role's own stream (its run's logs).

    Once the role has ended, what a process the program left behind writes is not its to keep.
    """
    for line in stream:
        if ended.is_set():
            return
        tail.append(line.rstrip("\n"))
        echo.write(line)
    echo.flush()
