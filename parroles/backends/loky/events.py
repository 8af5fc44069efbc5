"""A pool's Manager process, where each batch's cancel event lives, and the watch that reports its death.

The Manager is a plain fork of the parent, so it is started before the pool
starts any thread of its own, and under ``START_LOCK`` (a fork while another
thread is halfway through starting a process would copy that start's pipes).
It is deaf to Ctrl-C and dies with the parent (``lifeline.init_manager_process``).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.managers import SyncManager
from typing import Any

from parroles.backends import START_LOCK
from parroles.backends.loky.lifeline import init_manager_process


class CancelEvents:
    """Makes the cancel events of a pool's batches; ``on_death`` hears it if the Manager process exits."""

    def __init__(self, on_death: Callable[[str], None]) -> None:
        self._manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        with START_LOCK:
            self._manager.start(init_manager_process, (os.getpid(),))
        self._process = self._manager._process  # type: ignore[attr-defined]
        self._on_death = on_death
        self._stop_r, self._stop_w = os.pipe()
        self._watcher = threading.Thread(target=self._watch, name="parroles-manager-watch", daemon=True)
        self._watcher.start()

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    def alive(self) -> bool:
        return bool(self._process.is_alive())

    def new(self) -> Any:
        """A fresh event (a proxy that workers can wait on and the parent can set)."""
        return self._manager.Event()

    def shutdown(self) -> None:
        os.write(self._stop_w, b"x")
        self._watcher.join()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            self._manager.shutdown()
        except Exception:  # noqa: BLE001 - already dead: nothing left to stop
            pass

    def _watch(self) -> None:
        ready = wait([self._process.sentinel, self._stop_r])
        if self._process.sentinel in ready and self._stop_r not in ready:
            self._on_death(f"the cancel channel was lost (Manager process exited: {self._process.exitcode})")
