"""Each run's cache key, computed as it is about to be dispatched, and the ledger's completed runs it may reuse.

A run's key (``cache.keys``) needs the outputs of the roles it needs, so it
is computed when the run is about to be dispatched, never before. Every run
gets one, reuse or not, so that a later batch (and ``parroles why``) can
compare. With ``reuse`` on, the batch reads the ledger once as it starts:
the newest COMPLETED run of each key among its roles' names (in one batch
only, when ``reuse`` names it). A hit is checked against its recorded
digest before it is taken; one that does not match is skipped with a
warning, never handed on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from parroles.cache.code import CodeDigests
from parroles.cache.keys import FileDigests, Key, code_part, key_of
from parroles.digests import canonical_json, content_digest
from parroles.errors import ConfigError, ParrolesWarning
from parroles.pipeline import Role
from parroles.runner.tracked import TrackedRun

if TYPE_CHECKING:
    from parroles.ledger import Ledger


@dataclasses.dataclass(frozen=True)
class Hit:
    """A COMPLETED run of the ledger with the same key: the run that ran, and its output."""

    run_id: str
    output_json: str
    output_digest: str
    output_kind: str | None


_INDEX_SQL = """
    SELECT cache_key, coalesce(reused_from, run_id)::VARCHAR, output::VARCHAR, output_digest, output_kind
    FROM runs
    WHERE status = 'COMPLETED' AND cache_key IS NOT NULL AND output IS NOT NULL
      AND role IN (SELECT unnest(?::VARCHAR[])) {scope}
    QUALIFY row_number() OVER (PARTITION BY cache_key ORDER BY finished_at DESC) = 1
"""


def reuse_index(ledger: Ledger, names: Sequence[str], only_batch: str | None) -> dict[str, Hit]:
    """The newest COMPLETED run of each key among the runs of ``names`` (of ``only_batch`` alone if given)."""
    scope, params = ("AND parent_run_id = ?", [list(names), only_batch]) if only_batch else ("", [list(names)])
    index = {}
    for key, run_id, output, digest, kind in ledger.query(_INDEX_SQL.format(scope=scope), params):
        if content_digest(output.encode()) != digest:
            warnings.warn(ParrolesWarning(f"run {run_id}'s output does not match its output_digest: "
                                          "not reused"), stacklevel=2)
            continue
        index[key] = Hit(run_id, output, digest, kind)
    return index


def reuse_scope(ledger: Ledger, reuse: bool | str) -> str | None:
    """The batch ``reuse`` names, resolved (an id's start is enough); None for the whole ledger."""
    if reuse is True or reuse is False:
        return None
    return ledger.resolve_batch_id(reuse)


class RunKeys:
    """The keys of a batch's runs, and with ``reuse`` on, the completed runs they may take instead of running."""

    def __init__(self, roles: Sequence[Role], executor: Callable[..., Any] | None,
                 index: Mapping[str, Hit] | None) -> None:
        self._roles = roles
        self._executor = executor
        self._index = index
        self._codes = CodeDigests()
        self._files = FileDigests()  # roles that read the same files digest them once
        self._code_parts: dict[tuple[Any, ...], str] = {}  # canonical JSON, once per function (roles keep them)
        self._plain_keys: dict[tuple[Any, ...], Key] = {}  # the keys of runs that have only a name and code

    def key(self, run: TrackedRun, runs: Sequence[TrackedRun]) -> Key:
        """``run``'s key, from the outputs of the runs it needs (each ended, as it is about to be dispatched)."""
        role = self._roles[run.position]
        needs: dict[str, str | dict[str, str]] = {}
        for position in run.needs:
            upstream = runs[position]
            failed = run.failed_needs.get(upstream.name)
            needs[upstream.name] = (upstream.output_digest if upstream.output_digest is not None
                                    else {"status": failed.status if failed else "unknown"})
        params = role.params if role.fn is not None else None
        if needs or role.inputs or params:
            return key_of(run.name, lambda: self.code_json(role), params, needs, role.inputs, digests=self._files)
        # Its name and code alone: the same key for each run of the same role and function (a plain list of
        # names run through one executor), computed once.
        which = (run.name, params is None, self._code_identity(role))
        key = self._plain_keys.get(which)
        if key is None:
            key = self._plain_keys[which] = key_of(run.name, lambda: self.code_json(role), params, {}, ())
        return key

    def code_json(self, role: Role) -> str:
        """The code part of ``role``'s keys, as canonical JSON (NotReusable if its code cannot be read)."""
        which = self._code_identity(role)
        part = self._code_parts.get(which)
        if part is None:
            fn = role.fn if role.fn is not None else self._executor
            part = canonical_json(code_part(self._codes, fn, role.version, role.cache_includes))
            self._code_parts[which] = part
        return part

    def _code_identity(self, role: Role) -> tuple[Any, ...]:
        fn = role.fn if role.fn is not None else self._executor
        if fn is None:  # Graph.of and role_executor_for have refused this already
            raise ConfigError(f"role {role.name!r} has no function")
        return (id(fn), role.version, *map(id, role.cache_includes))

    def hit(self, key: Key) -> Hit | None:
        """The completed run to reuse for ``key``, if reuse is on and the ledger has one."""
        if self._index is None or key.digest is None:
            return None
        return self._index.get(key.digest)
