"""parroles: run CPU-heavy roles in parallel OS processes, with an honest DuckDB ledger.

``__all__`` is what users need: ``run`` and ``execute_roles_parallel``, the
config, the ledger, the role vocabulary, results and the error tree. Names
are imported lazily, so ``import parroles`` in a worker process (or for
``parroles --help``) does not pay for duckdb, loky or pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "parroles.runner.execute",
    "execute_roles_parallel": "parroles.runner.execute",
    "shutdown_workers": "parroles.backends.loky.pool",
    "start_workers": "parroles.runner.workers",
    "write_report": "parroles.report",
    "diff_batches": "parroles.report",
    "token_from_result": "parroles.tokens",
    "Role": "parroles.pipeline",
    "Verdict": "parroles.pipeline",
    "merge_review_and_tests": "parroles.pipeline",
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
    "content_digest": "parroles.digests",
    "BatchResult": "parroles.results",
    "RoleRunResult": "parroles.results",
    "RunStatus": "parroles.results",
    "Reason": "parroles.results",
    "RunRecord": "parroles.results",
    "RunEvent": "parroles.results",
    "LogLine": "parroles.results",
    "RunSummary": "parroles.results",
    "RunUpdate": "parroles.results",
    "BatchRecord": "parroles.results",
    "BatchState": "parroles.results",
    "ErrorInfo": "parroles.results",
    "FailedNeed": "parroles.results",
    "ParrolesError": "parroles.errors",
    "ConfigError": "parroles.errors",
    "SpecError": "parroles.errors",
    "UnsafeQueryError": "parroles.errors",
    "BackendUnavailable": "parroles.errors",
    "BackendError": "parroles.errors",
    "LedgerError": "parroles.errors",
    "LedgerBusyError": "parroles.errors",
    "ImmutableRunError": "parroles.errors",
    "RunNotFoundError": "parroles.errors",
    "ParallelExecutionFailed": "parroles.errors",
    "BatchInterrupted": "parroles.errors",
    "RoleCancelled": "parroles.errors",
    "RoleTimeout": "parroles.errors",
    "WorkerCrashed": "parroles.errors",
    "MemoryLimitExceeded": "parroles.errors",
    "UpstreamFailed": "parroles.errors",
    "RunOrphaned": "parroles.errors",
    "BatchAbandoned": "parroles.errors",
    "CommandFailed": "parroles.errors",
    "Retry": "parroles.errors",
    "InvalidTransition": "parroles.errors",
    "NoActiveRole": "parroles.errors",
    "InvalidHandoffToken": "parroles.errors",
    "InvalidDigest": "parroles.errors",
    "OutputError": "parroles.errors",
    "EventPayloadError": "parroles.errors",
    "ParrolesWarning": "parroles.errors",
    "LedgerPendingWarning": "parroles.errors",
    "JournalDamagedWarning": "parroles.errors",
    "BackendWarning": "parroles.errors",
}

__all__ = sorted(_EXPORTS)  # one list: what is exported is what the lazy map can import


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
    from parroles.backends.loky.pool import shutdown_workers
    from parroles.config import ParallelRoleConfig
    from parroles.digests import content_digest
    from parroles.errors import (
        BackendError,
        BackendUnavailable,
        BackendWarning,
        BatchAbandoned,
        BatchInterrupted,
        CommandFailed,
        ConfigError,
        EventPayloadError,
        ImmutableRunError,
        InvalidDigest,
        InvalidHandoffToken,
        InvalidTransition,
        JournalDamagedWarning,
        LedgerBusyError,
        LedgerError,
        LedgerPendingWarning,
        MemoryLimitExceeded,
        NoActiveRole,
        OutputError,
        ParallelExecutionFailed,
        ParrolesError,
        ParrolesWarning,
        Retry,
        RoleCancelled,
        RoleTimeout,
        RunNotFoundError,
        RunOrphaned,
        SpecError,
        UnsafeQueryError,
        UpstreamFailed,
        WorkerCrashed,
    )
    from parroles.ledger import Ledger
    from parroles.pipeline import Role, Verdict, merge_review_and_tests
    from parroles.report import diff_batches, write_report
    from parroles.results import (
        BatchRecord,
        BatchResult,
        BatchState,
        ErrorInfo,
        FailedNeed,
        LogLine,
        Reason,
        RoleRunResult,
        RunEvent,
        RunRecord,
        RunStatus,
        RunSummary,
        RunUpdate,
    )
    from parroles.role_context import RoleContext, context
    from parroles.roles import AgentRole, Code, Fix, HandoffToken, Plan, Review, RoleOutput, TestReport
    from parroles.runner.execute import execute_roles_parallel, run
    from parroles.runner.workers import start_workers
    from parroles.tokens import token_from_result
