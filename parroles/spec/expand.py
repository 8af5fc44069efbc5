"""A spec's pipeline: ``needs`` and ``matrix`` checked, matrix roles expanded, the graph validated.

A role with ``matrix = { lr = [0.1, 0.01], seed = [1, 2] }`` becomes one role
per combination (``Role.expand``: first key slowest, values as TOML writes
them), each called with its params plus its matrix values. A need that names a
matrix role means every one of its expansions. Each problem is a line of the
spec's ``SpecError``, as for any other spec problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from parroles.pipeline import Graph, Role, expansions
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
    """Every role with its matrix expanded and its needs resolved to role names, the graph checked whole
    (by ``Graph.checked``, as the API's roles are: duplicates, needs, cycles, strict_handoffs)."""
    expanded = [role for entry in declared for role in _expansions(entry)]
    graph, found = Graph.checked(pipeline_roles(expanded), strict_handoffs=strict_handoffs, where="spec")
    problems += found
    return [dataclasses.replace(role, needs=tuple(expanded[position].name for position in needed))
            for role, needed in zip(expanded, graph.needs, strict=True)]


def _expansions(entry: Declared) -> list[SpecRole]:
    if entry.matrix is None:
        return [entry.role]
    return [dataclasses.replace(entry.role, name=name, params={**entry.role.params, **chosen},
                                matrix_of=entry.role.name)
            for name, chosen in expansions(entry.role.name, entry.matrix)]


def pipeline_roles(roles: Sequence[SpecRole]) -> list[Role]:
    """The roles as the runner takes them, each with the function its workers call (a spec's Roles)."""
    return [Role(role.name, role.function(), params=role.params if role.call is not None else {},
                 needs=role.needs, timeout=role.timeout, matrix_of=role.matrix_of,
                 on_failed_needs=role.on_failed_needs, retries=role.retries, retry_on=role.retry_on,
                 version=role.version, inputs=role.inputs, threads=role.threads, memory_limit=role.memory_limit)
            for role in roles]
