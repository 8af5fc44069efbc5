"""What a batch's book decides is to be done, as values: the loop alone acts on them (``runner.loop``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StopAll:
    """Tell every worker of the batch that it is stopping (fail-fast, a signal, a lost channel)."""


@dataclasses.dataclass(frozen=True)
class StopRun:
    """Tell one running role to stop (its own timeout)."""

    dispatch_id: int
    why: str


@dataclasses.dataclass(frozen=True)
class KillRun:
    """Kill the worker of one role whose grace ran out."""

    dispatch_id: int


@dataclasses.dataclass(frozen=True)
class WatchMemory:
    """Watch the processes of one running role: past ``limit`` bytes resident, the loop hears ``MemoryExceeded``."""

    dispatch_id: int
    pid: int  # its worker's
    limit: int


@dataclasses.dataclass(frozen=True)
class ForgetMemory:
    """Stop watching a role that ended."""

    dispatch_id: int


Command = StopAll | StopRun | KillRun | WatchMemory | ForgetMemory  # what the loop is to do; only the loop acts
