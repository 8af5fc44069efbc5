"""What a running role sees of parroles: ``parroles.context()``.

This module is imported in worker processes; it must stay free of the
ledger and of duckdb.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from parroles.errors import EventPayloadError, NoActiveRole, RoleCancelled
from parroles.results import FailedNeed
from parroles.roles import HandoffToken, RoleName


@dataclasses.dataclass
class RoleContext:
    """The running role's view: who it is, whether to stop, and a way to emit events."""

    role: RoleName
    run_id: str
    parent_run_id: str
    attempt: int
    _stop: Callable[[], str | None]
    _emit: Callable[[str, Any], None]
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)  # needed role -> its output
    handoffs: dict[str, HandoffToken] = dataclasses.field(default_factory=dict)  # needed role -> its token
    # on_failed_needs="run": each needed role that did not complete -> how it ended
    failed_needs: dict[str, FailedNeed] = dataclasses.field(default_factory=dict)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # the keyword arguments its fn is called with
    failure: BaseException | None = dataclasses.field(default=None, repr=False)  # what it raised (its worker's)

    def cancelled(self) -> bool:
        """True once fail-fast, an interrupt or this role's own timeout has been signalled."""
        return self._stop() is not None

    def check_cancelled(self) -> None:
        """Raise RoleCancelled if the role has been told to stop."""
        why = self._stop()
        if why is not None:
            raise RoleCancelled(f"role {self.role} ({self.run_id}) cancelled: {why}")

    def emit(self, kind: str, payload: Any = None) -> None:
        """Record an event of this run. ``payload`` must be JSON-serialisable."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        try:
            kind.encode()
        except UnicodeEncodeError:
            raise EventPayloadError(f"event kind {kind!r} is not valid Unicode text (a lone surrogate)") from None
        self._emit(kind, payload)


_current: contextvars.ContextVar[RoleContext | None] = contextvars.ContextVar("parroles_role", default=None)
# Threads started by a role do not inherit the context variable; this fallback
# lets them reach the context of the (only) role running in this process.
_process_role: RoleContext | None = None
_lock = threading.Lock()


def context() -> RoleContext:
    """The context of the role running in this process; raises NoActiveRole elsewhere."""
    ctx = _current.get() or _process_role
    if ctx is None:
        raise NoActiveRole("parroles.context() is only available inside a running role")
    return ctx


def _enter(ctx: RoleContext) -> contextvars.Token[RoleContext | None]:
    global _process_role
    with _lock:
        _process_role = ctx
    return _current.set(ctx)


def _leave(token: contextvars.Token[RoleContext | None]) -> None:
    global _process_role
    with _lock:
        _process_role = None
    _current.reset(token)
