"""A batch's beginning: its row and its QUEUED runs recorded, and the parent's book of it opened.

What a run was given is recorded here, once, as the batch starts: its
keyword arguments (``runs.params``), the role a matrix expansion came from
(``runs.matrix_of``), and for a role that needs nothing, when it was ready.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from parroles.config import ParallelRoleConfig
from parroles.errors import ConfigError
from parroles.pipeline import Graph, Role
from parroles.results import BatchState, RetryPolicy, RunUpdate, storable
from parroles.roles import as_role, without_nonfinite
from parroles.runner import provenance
from parroles.runner.attempts import Provenance
from parroles.runner.batch import Batch
from parroles.runner.history import expected_durations
from parroles.runner.reuse import RunKeys, reuse_index, reuse_scope
from parroles.runner.tracked import TrackedRun, new_run_ids

if TYPE_CHECKING:  # imported where used: a cold start spawns workers before the ledger's modules load
    from parroles.ledger import Ledger


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a batch came from, as its row records it: a spec file (``parroles run``), a batch it resumes."""

    spec_path: str | None = None
    resumed_from: str | None = None  # None: the batch that ``config.reuse`` names, if it names one


NO_ORIGIN = Origin()  # a batch of the Python API


def create_batch(ledger: Ledger, batch_id: str, graph: Graph, spec_digest: str, config: ParallelRoleConfig,
                 name: str | None, git_sha: Future[str | None],
                 on_update: Callable[[RunUpdate], None] | None = None,
                 on_output: Callable[[str, str, str], None] | None = None,
                 executor: Callable[..., Any] | None = None, origin: Origin = NO_ORIGIN) -> Batch:
    """Record the batch (its graph already validated) and its QUEUED runs; the book that follows them.

    ``executor`` runs the roles that have no ``fn`` (its code is part of their cache keys).
    """
    from parroles.ledger.owner import Owner
    from parroles.ledger.pending import NewRuns

    if ledger.has_batch(batch_id):
        raise ConfigError(f"batch {batch_id!r} is already in the ledger; use a new parent_run_id")
    scope = reuse_scope(ledger, config.reuse)  # a batch to reuse from that is not in the ledger: nothing written
    index = reuse_index(ledger, [str(r.name) for r in graph.roles], scope) if config.reuse is not False else None
    now, owner, sha = time.time(), Owner.current(), provenance.answer(git_sha)
    params = _recorded_params(graph.roles)
    batch_policy = retry_policy(config)
    runs = [TrackedRun(i, as_role(str(role.name)), str(role.name), run_id,
                       role.timeout if role.timeout is not None else config.timeout_for(str(role.name)),
                       needs=graph.needs[i], runs_after_failed_needs=role.on_failed_needs == "run",
                       ready_at=None if graph.needs[i] else now,
                       policy=batch_policy if role.retries is None and role.retry_on is None
                       else retry_policy(config, role),
                       params_json=params[i] if params else None, matrix_of=role.matrix_of,
                       threads=role.threads if role.threads is not None else config.threads,
                       memory_limit=_memory_limit(role, config))
            for (i, role), run_id in zip(enumerate(graph.roles), new_run_ids(len(graph.roles)), strict=True)]
    row = {"batch_id": batch_id, "name": name, "spec_digest": spec_digest,
           "config": json.dumps(config.to_json_dict()), "state": BatchState.RUNNING.value, "started_at": now,
           "n_roles": len(runs), "owner_host": owner.host, "owner_pid": owner.pid, "owner_started": owner.started,
           "spec_path": origin.spec_path, "resumed_from": origin.resumed_from or scope, "run_order": config.order}
    new_runs = NewRuns([r.run_id for r in runs], [r.position for r in runs], [r.name for r in runs],
                       batch_id, spec_digest, sha, now, params=params,
                       matrix_of=_matrix_families(graph.roles),
                       waiting=[bool(needs) for needs in graph.needs] if any(graph.needs) else None)
    ledger.writer.start_batch(row, new_runs)
    keys = RunKeys(graph.roles, executor, index)
    expected = expected_durations(ledger, graph.roles, keys.code_json) if config.order == "longest_first" else None
    return Batch(ledger.writer, batch_id, config, runs, on_update, on_output, Provenance(batch_id, spec_digest, sha),
                 keys=keys, expected_ms=expected)


def retry_policy(config: ParallelRoleConfig, role: Role | None = None) -> RetryPolicy:
    """The batch's retry policy, with what ``role`` (if given) says for itself."""
    retries = role.retries if role is not None and role.retries is not None else config.retries
    retry_on = tuple(role.retry_on) if role is not None and role.retry_on is not None else config.retry_on
    return RetryPolicy(retries, config.retry_delay, config.retry_backoff, config.retry_jitter,
                       config.retry_max_delay, retry_on)


def _memory_limit(role: Role, config: ParallelRoleConfig) -> int | None:
    limit = role.memory_limit if role.memory_limit is not None else config.memory_limit
    if limit is not None and config.backend != "loky":
        raise ConfigError(f"role {role.name!r}: memory_limit needs the loky backend (on Dask, set the workers' "
                          "own memory limit)")
    return int(limit) if limit is not None else None


def _recorded_params(roles: list[Role]) -> list[str | None] | None:
    """Each role's keyword arguments as JSON (``runs.params``); None where it takes none (``fn(role, run_id)``).

    A value JSON cannot hold is recorded as ``{"$repr": repr(value)}``, so the record says what it was.
    """
    if all(role.fn is None for role in roles):
        return None
    return [_params_json(role.params) if role.fn is not None else None for role in roles]


def _params_json(params: Mapping[str, Any]) -> str:
    finite, _ = without_nonfinite(params)  # as outputs store them: JSON has no NaN
    return json.dumps(_storable_text(finite), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=_repr_of)


def _storable_text(value: Any) -> Any:
    """Strings (keys too) with a lone surrogate written as its escape: one odd param never blocks the ledger."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k) if isinstance(k, str) else k: _storable_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable_text(item) for item in value]
    return value


def _repr_of(value: Any) -> dict[str, str]:
    return {"$repr": repr(value)}


def _matrix_families(roles: list[Role]) -> list[str | None] | None:
    families = [role.matrix_of for role in roles]
    return families if any(families) else None
