"""Who owns a batch: host, pid and process start time, and whether that owner still lives.

The start time tells a live owner from an unrelated process that reused its pid.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import psutil


@dataclasses.dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def is_alive(self) -> bool | None:
        """True or False for an owner on this host; None when it runs elsewhere (unknowable here)."""
        if self.host != socket.gethostname():
            return None
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
