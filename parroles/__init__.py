"""parroles: run CPU-heavy roles in parallel OS processes, with an honest DuckDB ledger.

Names are imported lazily, so ``import parroles`` in a worker process (or for
``parroles --help``) does not pay for duckdb, loky or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "execute_roles_parallel": "parroles.run.execute",
    "shutdown_workers": "parroles.backends.loky.pool",
    "token_from_result": "parroles.tokens",
    "ParallelRoleConfig": "parroles.config",
    "Ledger": "parroles.ledger",
    "context": "parroles.role_context",
    "RoleContext": "parroles.role_context",
    "AgentRole": "parroles.roles",
    "Plan": "parroles.roles",
    "Code": "parroles.roles",
    "Review": "parroles.roles",
    "TestReport": "parroles.roles",
    "Fix": "parroles.roles",
    "RoleOutput": "parroles.roles",
    "HandoffToken": "parroles.roles",
    "content_digest": "parroles.roles",
    "validate_digest": "parroles.roles",
    "to_json": "parroles.roles",
    "output_from_json": "parroles.roles",
    "RoleRunResult": "parroles.results",
    "RunStatus": "parroles.results",
    "RunRecord": "parroles.results",
    "RunEvent": "parroles.results",
    "RunSummary": "parroles.results",
    "RunUpdate": "parroles.results",
    "BatchRecord": "parroles.results",
    "ErrorInfo": "parroles.results",
    "Reason": "parroles.results",
    "ParrolesError": "parroles.errors",
    "ConfigError": "parroles.errors",
    "SpecError": "parroles.errors",
    "LedgerError": "parroles.errors",
    "LedgerBusyError": "parroles.errors",
    "ImmutableRunError": "parroles.errors",
    "RunNotFoundError": "parroles.errors",
    "BackendError": "parroles.errors",
    "BackendUnavailable": "parroles.errors",
    "UnsafeQueryError": "parroles.errors",
    "LedgerPendingWarning": "parroles.errors",
    "ParallelExecutionFailed": "parroles.errors",
    "BatchInterrupted": "parroles.errors",
    "RoleCancelled": "parroles.errors",
    "NoActiveRole": "parroles.errors",
    "InvalidHandoffToken": "parroles.errors",
    "InvalidDigest": "parroles.errors",
    "OutputError": "parroles.errors",
    "EventPayloadError": "parroles.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'parroles' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from parroles.config import ParallelRoleConfig
    from parroles.errors import (
        BackendError,
        BackendUnavailable,
        BatchInterrupted,
        ConfigError,
        EventPayloadError,
        ImmutableRunError,
        InvalidDigest,
        InvalidHandoffToken,
        LedgerBusyError,
        LedgerError,
        LedgerPendingWarning,
        NoActiveRole,
        OutputError,
        ParallelExecutionFailed,
        ParrolesError,
        RoleCancelled,
        RunNotFoundError,
        SpecError,
        UnsafeQueryError,
    )
    from parroles.run.execute import execute_roles_parallel
    from parroles.ledger import Ledger
    from parroles.backends.loky.pool import shutdown_workers
    from parroles.results import (
        BatchRecord,
        ErrorInfo,
        Reason,
        RoleRunResult,
        RunEvent,
        RunRecord,
        RunStatus,
        RunSummary,
        RunUpdate,
    )
    from parroles.role_context import RoleContext, context
    from parroles.roles import (
        AgentRole,
        Code,
        Fix,
        HandoffToken,
        Plan,
        Review,
        RoleOutput,
        TestReport,
        content_digest,
        output_from_json,
        to_json,
        validate_digest,
    )
    from parroles.tokens import token_from_result
