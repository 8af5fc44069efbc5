"""Idle loky pools kept between batches, so a batch after the first starts on warm workers.

Like joblib's reusable executor: a process keeps at most one idle pool. A
batch takes it if its size fits the batch (at least the workers the batch can
use, at most its ``max_concurrent``) and its workers started the way the batch
asks (``start_method``); otherwise it is shut down and the batch starts its
own. The batch gives it back when it ends cleanly. An
idle pool is shut down after ``ParallelRoleConfig.idle_worker_timeout``
seconds, at interpreter exit, or by ``shutdown_workers()``. A forked child
forgets its parent's pool: it is not the child's to use or to stop.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parroles.backends.loky.backend import LokyBackend

STARTED_AHEAD_WAIT = 60.0  # seconds, at least, that a pool started ahead of its batch waits for it
_lock = threading.Lock()
_idle: tuple[LokyBackend, threading.Timer] | None = None


def idle_pool() -> LokyBackend | None:
    """The pool kept idle for the next batch, if any (a view: it stays kept)."""
    with _lock:
        return _idle[0] if _idle is not None else None


def take(needed: int, limit: int, start_method: str) -> LokyBackend | None:
    """The idle pool, if it has ``needed`` to ``limit`` workers started so and is healthy; the caller's until
    ``keep``."""
    global _idle
    with _lock:
        idle, _idle = _idle, None
    if idle is None:
        return None
    pool, timer = idle
    timer.cancel()
    if pool.fits(needed, limit, start_method) and pool.healthy():
        return pool
    pool.shutdown()
    return None


def keep(pool: LokyBackend, seconds: float) -> None:
    """Keep ``pool`` idle for the next batch, for at most ``seconds``."""
    global _idle
    timer = threading.Timer(seconds, _expire, (pool,))
    timer.daemon = True
    with _lock:
        previous, _idle = _idle, (pool, timer)
    timer.start()
    if previous is not None:  # another thread's batch kept one meanwhile: one idle pool is enough
        previous[1].cancel()
        previous[0].shutdown()


def shutdown_workers() -> None:
    """Stop the idle worker pool, if any. Batches after this start new workers."""
    global _idle
    with _lock:
        idle, _idle = _idle, None
    if idle is not None:
        idle[1].cancel()
        idle[0].shutdown()


def _expire(pool: LokyBackend) -> None:
    global _idle
    with _lock:
        if _idle is None or _idle[0] is not pool:
            return  # taken by a batch meanwhile
        _idle = None
    pool.shutdown()


# A forked child's copies of its parent's pools: never used, never freed (freeing
# one would run its Manager's finalizer, which shuts down the parent's Manager).
_inherited: list[object] = []


def _forget_after_fork() -> None:
    global _idle, _lock
    _inherited.append(_idle)
    _idle, _lock = None, threading.Lock()


atexit.register(shutdown_workers)
os.register_at_fork(after_in_child=_forget_after_fork)
