"""Where roles run: the list of backends (here, and only here), and what each is given.

A backend module is imported only when a batch uses it. Each gets options of
its own (``LokyOptions``, ``DaskOptions``), never the whole batch config.
This package is imported by worker processes too: it stays light.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parroles.backends.base import Backend


@dataclasses.dataclass(frozen=True)
class LokyOptions:
    """Local worker processes, one single-worker loky executor per concurrency slot."""

    max_concurrent: int
    idle_worker_timeout: float  # seconds a cleanly ended batch's workers are kept for the next batch
    start_method: str = "loky"  # one of START_METHODS


# Held while parroles starts a process (a worker, the loky backend's Manager, git). The Manager is a plain
# fork: one taken while another thread is halfway through starting a process would copy that start's pipes,
# and the copy (never closed, never exec'd) would keep the other thread waiting for their end forever.
START_LOCK = threading.Lock()

# How loky workers may start: fresh interpreters (loky's own), or forked from a preloaded server.
START_METHODS = ("loky", "forkserver") if os.name == "posix" else ("loky",)  # multiprocessing's forkserver: POSIX


@dataclasses.dataclass(frozen=True)
class DaskOptions:
    """A Dask distributed cluster: at ``address``, or a LocalCluster started for the batch."""

    address: str | None
    connect_timeout: float


BackendOptions = LokyOptions | DaskOptions


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    target: str  # "module:Class"
    requires: str | None  # an optional distribution it needs, by import name
    install: str  # how to get it


BACKENDS: dict[str, BackendEntry] = {
    "loky": BackendEntry("parroles.backends.loky.backend:LokyBackend", None, ""),
    "dask": BackendEntry("parroles.backends.dask.backend:DaskBackend", "distributed", "pip install 'parroles[dask]'"),
}
NAMES = tuple(BACKENDS)


def missing_requirement(name: str) -> str | None:
    """How to install what backend ``name`` needs, if it is not installed; None if it is."""
    entry = BACKENDS[name]
    if entry.requires is None or importlib.util.find_spec(entry.requires) is not None:
        return None
    return entry.install


def backend_class(name: str) -> type[Backend]:
    module, _, attribute = BACKENDS[name].target.partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), attribute)
    return cls
