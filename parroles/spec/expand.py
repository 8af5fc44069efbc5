"""A spec's pipeline: ``needs`` and ``matrix`` checked, matrix roles expanded, the graph validated.

A role with ``matrix = { lr = [0.1, 0.01], seed = [1, 2] }`` becomes one role
per combination (``Role.expand``: first key slowest, values as TOML writes
them), each called with its params plus its matrix values. A need that names a
matrix role means every one of its expansions. Each problem is a line of the
spec's ``SpecError``, as for any other spec problem.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from parroles.errors import ConfigError
from parroles.pipeline import Graph, Role, did_you_mean, expansions
from parroles.spec.roles import SpecRole

MATRIX_VALUE_TYPES = (str, int, float, bool)  # what a name like ``train[lr=0.1]`` can show faithfully


@dataclasses.dataclass(frozen=True)
class Declared:
    """One ``[[roles]]`` table as written, before its matrix is expanded."""

    role: SpecRole
    matrix: dict[str, list[Any]] | None


def check_needs(value: Any, label: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not (isinstance(value, list) and all(isinstance(need, str) and need.strip() for need in value)):
        problems.append(f"{label}: needs must be a list of role names, e.g. needs = [\"planner\"]")
        return ()
    return tuple(value)


def check_matrix(value: Any, params: Any, label: str, problems: list[str]) -> dict[str, list[Any]] | None:
    """The matrix as written, or None (no matrix, or a bad one: then ``problems`` says why)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        problems.append(f"{label}: matrix must be a table of non-empty lists, e.g. matrix = {{ seed = [1, 2] }}")
        return None
    before = len(problems)
    for axis, values in value.items():
        if not isinstance(values, list) or not values:
            problems.append(f"{label}: matrix axis {axis!r} must be a non-empty list, got {values!r}")
        elif not all(isinstance(v, MATRIX_VALUE_TYPES) for v in values):
            problems.append(f"{label}: matrix axis {axis!r} must list strings, numbers or booleans")
        if isinstance(params, dict) and axis in params:
            problems.append(f"{label}: {axis!r} is both a matrix axis and a param; give it in one place")
    return value if len(problems) == before else None


def expand(declared: Sequence[Declared], strict_handoffs: bool, problems: list[str]) -> list[SpecRole]:
    """Every role with its matrix expanded and its needs resolved to role names; the graph checked whole."""
    expansions = [_expansions(entry) for entry in declared]
    names_of = {entry.role.name: [role.name for role in roles] for entry, roles in zip(declared, expansions,
                                                                                          strict=True)}
    expanded = [role for roles in expansions for role in roles]
    declared_counts = collections.Counter(entry.role.name for entry in declared)
    for name, count in collections.Counter(role.name for role in expanded).items():
        if count > 1 and declared_counts[name] <= 1:  # a name written twice is reported where it is read
            problems.append(f"role {name!r}: duplicate name after matrix expansion")
    known = {role.name for role in expanded}
    # Needs are resolved once per table as written, so a bad need is reported once, not once per expansion.
    needs = [_resolve(entry.role, names_of, known, problems) for entry in declared]
    resolved = [dataclasses.replace(role, needs=wanted)
                for roles, wanted in zip(expansions, needs, strict=True) for role in roles]
    # What is left to find, beside the problems above: cycles, a role that needs itself, strict_handoffs.
    unique: dict[str, SpecRole] = {}  # a duplicate is reported above: the first of each name is checked
    for role in resolved:
        unique.setdefault(role.name, role)
    try:
        Graph.of(pipeline_roles(list(unique.values())), strict_handoffs=strict_handoffs)
    except ConfigError as exc:
        problems.append(str(exc))
    return resolved


def _expansions(entry: Declared) -> list[SpecRole]:
    if entry.matrix is None:
        return [entry.role]
    return [dataclasses.replace(entry.role, name=name, params={**entry.role.params, **chosen},
                                matrix_of=entry.role.name)
            for name, chosen in expansions(entry.role.name, entry.matrix)]


def _resolve(role: SpecRole, names_of: dict[str, list[str]], known: set[str], problems: list[str]) -> tuple[str, ...]:
    needs: list[str] = []
    for need in role.needs:
        if need in names_of:
            needs += names_of[need]  # a matrix role's name means all of its expansions
        elif need in known:
            needs.append(need)  # one expansion, named in full
        else:
            problems.append(f"role {role.name!r}: needs {need!r}, which is no role of the spec"
                            f"{did_you_mean(need, [*names_of, *known])}")
    return tuple(dict.fromkeys(needs))


def pipeline_roles(roles: Sequence[SpecRole]) -> list[Role]:
    """The roles as the runner takes them, each with the function its workers call (a spec's Roles)."""
    return [Role(role.name, role.function(), params=role.params if role.call is not None else {},
                 needs=role.needs, timeout=role.timeout, matrix_of=role.matrix_of,
                 on_failed_needs=role.on_failed_needs) for role in roles]
