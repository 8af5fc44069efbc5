"""The one exception tree of parroles.

Every error parroles raises on purpose derives from :class:`ParrolesError`.
Errors that reach the command line carry the exit code they turn into
(``exit_code``); ``parroles.cli`` converts them in one place.

    ParrolesError (exit 1)
    ├── ConfigError (ValueError, exit 2) ........ a bad ParallelRoleConfig, spec or option
    │   ├── SpecError ........................... a spec file that cannot run (lists every problem)
    │   ├── UnsafeQueryError .................... SQL refused by ``parroles sql``
    │   └── BackendUnavailable .................. an optional backend that is not installed
    ├── LedgerError (exit 3) .................... the DuckDB ledger cannot be read or written
    │   ├── LedgerBusyError ..................... another process holds the file lock too long
    │   └── ImmutableRunError ................... a transition or event on a terminal run
    ├── RunNotFoundError (LookupError, exit 4) .. no such run or batch in the ledger
    ├── BackendError (exit 5) ................... the execution backend cannot be reached
    ├── ParallelExecutionFailed ................. no role completed and at least one failed
    ├── BatchInterrupted (exit 130/143) ......... SIGINT / SIGTERM ended the batch
    ├── RoleCancelled ........................... raised inside a role that was told to stop
    ├── Retry ................................... raised by a role that asks for another attempt
    ├── RoleTimeout ............................. ┐ recorded as a run's error.type (never raised by
    ├── WorkerCrashed ........................... │ parroles; importable, so every recorded type is):
    ├── MemoryLimitExceeded ..................... │ its own timeout, its worker died, its memory_limit,
    ├── UpstreamFailed .......................... │ a role it needs did not complete, its parent process
    ├── RunOrphaned ............................. │ died, the batch's own loop failed
    ├── BatchAbandoned .......................... ┘
    ├── CommandFailed ........................... a ``command`` role's program exited non-zero
    ├── InvalidTransition ....................... a run moved in a way its life does not allow (a bug)
    ├── NoActiveRole (RuntimeError) ............. ``parroles.context()`` outside a role
    ├── InvalidHandoffToken (ValueError) ........ a token whose output was altered
    ├── InvalidDigest (ValueError) .............. not 64 lowercase hex characters
    ├── OutputError (ValueError) ................ an output that is not JSON or is too large
    └── EventPayloadError (TypeError) ........... ``context().emit`` given a payload that is not JSON

    ParrolesWarning (UserWarning) ............... not errors; the command line prints them on one line
    ├── LedgerPendingWarning .................... a batch's last records wait in the journal (the file
    │                                             was busy); the next open applies them
    ├── JournalDamagedWarning ................... a journal damaged in its middle was applied up to the
    │                                             damage and kept aside as <journal>.damaged
    └── BackendWarning .......................... the backend could not do what stopping a role needs (a
                                                  Dask worker that could not be restarted)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parroles.results import RoleRunResult


class ParrolesError(Exception):
    """Root of every error parroles raises on purpose."""

    exit_code: int = 1


class ConfigError(ParrolesError, ValueError):
    """A configuration, option or spec value is invalid; nothing was run or written."""

    exit_code = 2


class SpecError(ConfigError):
    """A spec file cannot run. ``problems`` lists every problem found."""

    def __init__(self, path: str, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s): {joined}")


class UnsafeQueryError(ConfigError):
    """A query that ``parroles sql`` refuses to run."""


class LedgerError(ParrolesError):
    """The ledger cannot be opened, read or written. Never swallowed."""

    exit_code = 3


class LedgerBusyError(LedgerError):
    """Another process held the ledger's file lock for longer than the wait allows."""


class ParrolesWarning(UserWarning):
    """Root of the warnings parroles gives."""


class JournalDamagedWarning(ParrolesWarning):
    """A journal was damaged in its middle: applied up to the damage, the file kept aside."""


class BackendWarning(ParrolesWarning):
    """The backend could not do something a stop needs; the runs are recorded as they ended, the batch goes on."""


class LedgerPendingWarning(ParrolesWarning):
    """Records are durable in the journal but not yet in the ledger file; the next writable open applies them."""

    def __init__(self, path: str, records: int) -> None:
        super().__init__(f"{records} ledger record(s) wait in the journal beside {path} (the file was busy); "
                         "the next writable open of the ledger applies them")
        self.path = path
        self.records = records


class ImmutableRunError(LedgerError):
    """A transition or an event was asked of a run that is already terminal."""


class RunNotFoundError(ParrolesError, LookupError):
    """No run or batch with that id is in the ledger."""

    exit_code = 4


class BackendError(ParrolesError):
    """The execution backend cannot be reached (e.g. no Dask scheduler at the address); nothing ran."""

    exit_code = 5


class ParallelExecutionFailed(ParrolesError):
    """No role completed and at least one failed. ``results`` holds every result."""

    def __init__(self, detail: str, results: Sequence[RoleRunResult]) -> None:
        super().__init__(detail)
        self.results = list(results)


class BatchInterrupted(ParrolesError):
    """A signal ended the batch; the ledger was made consistent first."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(f"batch interrupted by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = exit_code


class RoleCancelled(ParrolesError):
    """Raised in a role (by ``check_cancelled()``) once it has been told to stop."""


class Retry(ParrolesError):
    """Raised by a role to ask for another attempt (bounded by its ``retries``), ``after`` seconds if given."""

    def __init__(self, message: str = "the role asked for another attempt", after: float | None = None) -> None:
        if after is not None and (isinstance(after, bool) or not isinstance(after, (int, float))
                                  or not 0 <= after < float("inf")):
            raise ValueError(f"Retry(after=...) takes a number of seconds >= 0, got {after!r}")
        super().__init__(message)
        self.after = None if after is None else float(after)


class RoleTimeout(ParrolesError):
    """A run's error type when its own timeout stopped it (reason ``timeout``)."""


class WorkerCrashed(ParrolesError):
    """A run's error type when the worker process running it died (reason ``crash``)."""


class MemoryLimitExceeded(ParrolesError):
    """A run's error type when its processes outgrew its ``memory_limit`` and were killed (reason ``memory``)."""


class UpstreamFailed(ParrolesError):
    """A run's error type when a role it needs did not complete, so it never started (reason ``upstream``)."""


class RunOrphaned(ParrolesError):
    """A run's error type when the process that ran its batch died before it ended (reason ``orphaned``)."""


class BatchAbandoned(ParrolesError):
    """A run's error type when the batch's own loop failed before it ended."""


class CommandFailed(ParrolesError):
    """A ``command`` role's program exited with a non-zero code (``returncode``)."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class InvalidTransition(ParrolesError, RuntimeError):
    """A run was moved in a way ``runner.lifecycle.TRANSITIONS`` does not allow: a bug in parroles."""


class NoActiveRole(ParrolesError, RuntimeError):
    """``parroles.context()`` was called outside a running role."""


class InvalidHandoffToken(ParrolesError, ValueError):
    """A handoff token's digest does not match its output."""


class InvalidDigest(ParrolesError, ValueError):
    """A content digest that is not 64 lowercase hexadecimal characters."""


class OutputError(ParrolesError, ValueError):
    """A role output that cannot be stored: not JSON-serialisable, or too large."""


class EventPayloadError(ParrolesError, TypeError):
    """An event's payload cannot be stored as JSON (raised by ``emit`` in the role; the run is FAILED, reason error)."""


class BackendUnavailable(ConfigError):
    """An optional execution backend whose dependencies are not installed."""
