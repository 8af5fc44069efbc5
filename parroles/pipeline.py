"""Pipelines: roles that need other roles of their batch, and the checks made before anything runs.

``Role(name, fn, params=..., needs=...)`` describes one role; a batch's roles
form a graph (``Graph``), validated whole before a worker starts or a ledger
row is written: duplicate names, needs that name no role, a role that needs
itself, cycles (named), and with ``strict_handoffs`` the standard
vocabulary's rules of who accepts handoffs from whom. ``RoleTable`` is the
batch's role executor when roles bring their own functions; it runs in
worker processes and imports neither the ledger nor duckdb.
``merge_review_and_tests`` merges a reviewer's and a tester's verdicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import graphlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from parroles.errors import ConfigError, NoActiveRole
from parroles.results import bytes_of, check_retry_on, threads_error
from parroles.role_context import context
from parroles.roles import ACCEPTS_FROM, AgentRole, Review, RoleName, TestReport, role_name

ON_FAILED_NEEDS = ("cancel", "run")  # what a role does when a role it needs FAILED or was CANCELLED


@dataclasses.dataclass(frozen=True)
class Role:
    """One role of a batch: ``fn(**params)`` runs in a worker once every role in ``needs`` COMPLETED.

    Without ``fn`` the batch's ``role_executor(role, run_id)`` runs it. ``needs``
    names roles of the same batch (names or ``AgentRole``s); ``timeout``
    overrides the batch's ``role_timeout``. ``on_failed_needs="run"`` runs it
    once its needs have *ended*, whatever their status (a fan-in over what
    succeeded: ``context().inputs`` holds the completed ones, ``context().failed_needs``
    the others); the default ``"cancel"`` cancels it (reason ``upstream``).
    ``matrix_of`` names the role a matrix expansion came from (``expand`` sets it).
    ``version``, ``inputs`` (file patterns) and ``cache_includes`` (helper
    functions) are parts of its cache key (``cache.keys``): what ``reuse`` and
    ``parroles why`` compare.
    """

    name: RoleName
    fn: Callable[..., Any] | None = None
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs: Sequence[RoleName] = ()
    timeout: float | None = None
    on_failed_needs: str = "cancel"
    matrix_of: str | None = None
    retries: int | None = None  # its own, instead of the batch's
    retry_on: Sequence[str] | None = None  # its own, instead of the batch's
    version: str | None = None  # stands in for its code's digest in its cache key
    inputs: Sequence[str] = ()  # file patterns (glob, ** too) whose contents are part of its cache key
    cache_includes: Sequence[Callable[..., Any]] = ()  # helpers elsewhere whose code is part of its key
    threads: int | None = None  # its numeric libraries' thread cap, instead of the batch's
    memory_limit: int | str | None = None  # its own, instead of the batch's (bytes, or "512MB", "2GiB")

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", role_name(self.name))
        if self.fn is not None and not callable(self.fn):
            raise ConfigError(f"role {self.name!r}: fn must be callable, got {self.fn!r}")
        if not isinstance(self.params, Mapping):
            raise ConfigError(f"role {self.name!r}: params must be a mapping of keyword arguments")
        if self.params and self.fn is None:
            raise ConfigError(f"role {self.name!r}: params are fn's keyword arguments, and it has no fn "
                              "(the batch's role_executor(role, run_id) takes none)")
        if self.on_failed_needs not in ON_FAILED_NEEDS:
            raise ConfigError(f"role {self.name!r}: on_failed_needs must be one of "
                              f"{', '.join(map(repr, ON_FAILED_NEEDS))}, got {self.on_failed_needs!r}")
        if self.retries is not None and (isinstance(self.retries, bool) or not isinstance(self.retries, int)
                                         or self.retries < 0):
            raise ConfigError(f"role {self.name!r}: retries must be an integer >= 0, got {self.retries!r}")
        if self.threads is not None and (problem := threads_error(self.threads)):
            raise ConfigError(f"role {self.name!r}: {problem}")
        if self.memory_limit is not None:
            object.__setattr__(self, "memory_limit", bytes_of(self.memory_limit, f"role {self.name!r}: memory_limit"))
        if self.retry_on is not None:
            if isinstance(self.retry_on, str) or not isinstance(self.retry_on, Sequence):
                raise ConfigError(f"role {self.name!r}: retry_on must be a list, got {self.retry_on!r}")
            try:
                object.__setattr__(self, "retry_on", check_retry_on(self.retry_on))
            except ValueError as exc:
                raise ConfigError(f"role {self.name!r}: retry_on: {exc}") from None
        self._check_key_parts()
        if self.needs != ():
            needs = (self.needs,) if isinstance(self.needs, (str, AgentRole)) else _listed(self.needs)
            if needs is None:
                raise ConfigError(f"role {self.name!r}: needs must be a list of role names, got {self.needs!r}")
            object.__setattr__(self, "needs", tuple(role_name(need) for need in needs))
        object.__setattr__(self, "params", dict(self.params))

    def _check_key_parts(self) -> None:
        if self.version is not None and (not isinstance(self.version, str) or not self.version):
            raise ConfigError(f"role {self.name!r}: version must be a non-empty string, got {self.version!r}")
        if self.inputs != ():  # the default needs no look (a batch may make thousands of roles)
            inputs = _listed(self.inputs)  # once: a generator read twice would be empty the second time
            if inputs is None or not all(isinstance(p, str) and p for p in inputs):
                raise ConfigError(f"role {self.name!r}: inputs must be a list of file patterns, got {self.inputs!r}")
            object.__setattr__(self, "inputs", inputs)
        if self.cache_includes != ():
            helpers = _listed(self.cache_includes)
            if helpers is None or not all(callable(helper) for helper in helpers):
                raise ConfigError(f"role {self.name!r}: cache_includes must list functions, "
                                  f"got {self.cache_includes!r}")
            object.__setattr__(self, "cache_includes", helpers)

    def expand(self, **axes: Sequence[Any]) -> list[Role]:
        """One role per combination of the axes' values, named ``name[a=1,b=2]``, called with them as params.

        The first axis varies slowest; values are written as TOML writes them.
        """
        if self.fn is None:
            raise ConfigError(f"role {self.name!r}: expand needs an fn to call with each combination's values")
        both = sorted(set(axes) & set(self.params))
        if both:
            raise ConfigError(f"role {self.name!r}: {', '.join(map(repr, both))} is both a matrix axis and a "
                              "param; give it in one place")
        return [dataclasses.replace(self, name=name, params={**self.params, **chosen}, matrix_of=str(self.name))
                for name, chosen in expansions(str(self.name), axes)]


def _listed(value: Any) -> tuple[Any, ...] | None:
    """The items of a list-like ``value`` (a list, tuple, set, generator), read once; None for anything else
    (a string or bytes is one value, not a list of characters)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return None
    return tuple(value)


def expansions(name: str, axes: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Each combination of the axes' values (the first axis slowest) with its name, ``name[a=1,b=2]``."""
    for axis, values in axes.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ConfigError(f"role {name!r}: matrix axis {axis!r} needs a non-empty list of values")
    found = []
    for combo in itertools.product(*axes.values()):
        chosen = dict(zip(axes, combo, strict=True))
        label = ",".join(f"{axis}={toml_value(value)}" for axis, value in chosen.items())
        found.append((f"{name}[{label}]", chosen))
    return found


def toml_value(value: Any) -> str:
    """A value as TOML writes it (the names of matrix expansions use it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the choice closest to a misspelt ``word`` (as click says it), else ``""``."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def as_roles(roles: Iterable[RoleName | Role]) -> list[Role]:
    return [role if isinstance(role, Role) else Role(role) for role in roles]


@dataclasses.dataclass(frozen=True)
class Graph:
    """The roles of a batch with, for each (by position), the positions of the roles it needs."""

    roles: list[Role]
    needs: list[tuple[int, ...]]

    @classmethod
    def of(cls, roles: Iterable[RoleName | Role], *, strict_handoffs: bool = False) -> Graph:
        """Validate the whole graph; ``ConfigError`` naming every problem found."""
        graph, problems = cls.checked(roles, strict_handoffs=strict_handoffs)
        if problems:
            raise ConfigError("; ".join(problems))
        return graph

    @classmethod
    def checked(cls, roles: Iterable[RoleName | Role], *, strict_handoffs: bool = False,
                where: str = "batch") -> tuple[Graph, list[str]]:
        """The graph and every problem found in it, each once (the one check of a graph: a spec's too).

        A need names a role, or a matrix role (``Role.expand``: each of its
        expansions, known by ``matrix_of``, never by the shape of a name).
        """
        given = list(roles)
        listed = as_roles(given)
        # A plain list of names may repeat one (each is a run of its own, the original contract);
        # once roles are Role objects, needs name them: names must be unique.
        unique = any(isinstance(role, Role) for role in given)
        positions: dict[str, int] = {}
        families: dict[str, list[int]] = {}
        problems = []
        for position, role in enumerate(listed):
            if str(role.name) in positions and unique:
                problems.append(f"role {role.name!r}: duplicate name{' after matrix expansion' * bool(role.matrix_of)}")
            positions.setdefault(str(role.name), position)
            if role.matrix_of is not None:
                families.setdefault(role.matrix_of, []).append(position)
        needs = [_needed(role, positions, families, where, problems) for role in listed]
        if strict_handoffs:
            problems += _strict_problems(listed)
        problems += [f"a cycle: {' -> '.join(cycle)} (each needs the next)" for cycle in _cycles(listed, needs)]
        return cls(listed, needs), list(dict.fromkeys(problems))  # an expansion's problem is its table's: once


def _needed(role: Role, positions: Mapping[str, int], families: Mapping[str, list[int]], where: str,
            problems: list[str]) -> tuple[int, ...]:
    """The positions ``role`` needs; what it names that is no role goes to ``problems``, under its table's name."""
    label = role.matrix_of or str(role.name)
    needed: list[int] = []
    for need in role.needs:
        if need == role.name or need == role.matrix_of:
            problems.append(f"role {label!r} needs itself")
        elif need in positions:
            needed.append(positions[str(need)])
        elif need in families:
            needed.extend(families[str(need)])  # a matrix role's name: every one of its expansions
        else:
            problems.append(f"role {label!r} needs {need!r}, which is no role of the {where}"
                            f"{did_you_mean(str(need), [*positions, *families])}")
    return tuple(dict.fromkeys(needed))


def _strict_problems(roles: list[Role]) -> list[str]:
    problems = []
    standard = {role.value: role for role in AgentRole}
    for role in roles:
        receiver = standard.get(str(role.name))
        for need in role.needs:
            giver = standard.get(str(need))
            if receiver is None or giver is None:
                continue  # custom names are unconstrained
            if giver not in ACCEPTS_FROM[receiver]:
                allowed = sorted(accepted.value for accepted in ACCEPTS_FROM[receiver]) or ["nobody"]
                problems.append(f"strict_handoffs: {receiver.value} accepts handoffs from {' and '.join(allowed)}, "
                                f"not from {giver.value}")
    return problems


def _cycles(roles: list[Role], needs: list[tuple[int, ...]]) -> list[list[str]]:
    """A cycle of needs, as the names along it, each needing the next (``graphlib`` finds it); else none."""
    if not any(needs):
        return []
    try:
        graphlib.TopologicalSorter({position: needed for position, needed in enumerate(needs)}).prepare()
    except graphlib.CycleError as exc:
        along = exc.args[1]  # each is needed by the next: read backwards, each needs the next
        return [[str(roles[position].name) for position in reversed(along)]]
    return []


@dataclasses.dataclass(frozen=True)
class RoleTable:
    """Runs in worker processes: the batch's role executor when roles bring their own ``fn``.

    A role of the table is called as ``fn(**params)``; any other role goes to
    the batch's ``role_executor(role, run_id)``.
    """

    functions: Mapping[str, tuple[Callable[..., Any], Mapping[str, Any]]]
    fallback: Callable[..., Any] | None

    def __call__(self, role: RoleName, run_id: str) -> Any:
        entry = self.functions.get(str(role))
        if entry is not None:
            fn, params = entry
            with contextlib.suppress(NoActiveRole):  # called outside a batch, it runs all the same
                context().params.update(params)
            return fn(**params)
        if self.fallback is None:
            raise ConfigError(f"role {role!r} has no fn and the batch has no role_executor")
        return self.fallback(role, run_id)


def role_executor_for(roles: Sequence[Role], fallback: Callable[..., Any] | None) -> Callable[..., Any]:
    """The one callable a batch's workers get: the table of roles' own functions, or ``fallback``."""
    functions = {str(role.name): (role.fn, role.params) for role in roles if role.fn is not None}
    missing = [str(role.name) for role in roles if role.fn is None]
    if missing and not callable(fallback):
        raise ConfigError(f"role_executor must be callable (roles {', '.join(missing)} have no fn), "
                          f"got {fallback!r}")
    if not functions:
        if fallback is None:
            raise ConfigError("a batch needs roles with a fn, or a role_executor to run them")
        return fallback
    return RoleTable(functions, fallback)


class Verdict(str, enum.Enum):
    """The merged verdict of a reviewer and a tester that ran side by side."""

    APPROVED = "approved"
    REQUIRES_FIX = "requires_fix"
    CONFLICT = "conflict"

    def __str__(self) -> str:
        return self.value


def merge_review_and_tests(review: Review, report: TestReport) -> Verdict:
    """Approved and passed: approved. Failed tests against any review: a conflict. Passed tests with a
    review that requires a fix: requires_fix; with one rejected without requiring a fix: approved."""
    if not report.passed:
        return Verdict.CONFLICT
    return Verdict.REQUIRES_FIX if review.requires_fix else Verdict.APPROVED
