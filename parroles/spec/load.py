"""Spec files: a batch described in TOML, validated completely before anything runs.

A spec file is code: its ``call`` entries import and run modules beside it,
so it is trusted like a Makefile. Validation imports those modules (once, in
the parent) to report a missing function before any worker starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

from parroles.backends import START_METHODS
from parroles.config import ParallelRoleConfig, spec_keys
from parroles.digests import content_digest
from parroles.errors import ConfigError, SpecError
from parroles.pipeline import ON_FAILED_NEEDS, Role, did_you_mean
from parroles.results import bytes_of, check_retry_on, threads_error
from parroles.spec.expand import Declared, check_matrix, check_needs, expand, pipeline_roles
from parroles.spec.roles import SpecRole

BATCH_KEYS = {"name", *spec_keys()}  # the config fields a spec may set (config.spec_keys), and its name
# A spec runs from `parroles run`, whose main module is parroles' own (safe to import again in a worker),
# so its workers fork from a preloaded server where there is one: a faster, cheaper first batch.
SPEC_START_METHOD = "forkserver" if "forkserver" in START_METHODS else "loky"
ROLE_KEYS = {"name", "call", "command", "params", "timeout", "needs", "matrix", "on_failed_needs", "retries",
             "retry_on", "version", "inputs", "threads", "memory_limit"}


@dataclasses.dataclass(frozen=True)
class Spec:
    path: Path
    digest: str  # SHA-256 of the file's bytes: the batch's spec_digest
    name: str
    batch: dict[str, Any]  # the [batch] table's config keys
    roles: tuple[SpecRole, ...]  # matrix roles expanded: one per combination, named ``train[lr=0.1]``

    def config(self, **overrides: Any) -> ParallelRoleConfig:
        """The batch's config; ``overrides`` (command-line options) win when not None."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("dask_address") and "backend" not in given:  # --scheduler implies the dask backend
            given["backend"] = "dask"
        values = dict(self.batch) | given
        if values.get("backend", "loky") == "loky":  # the start method is a loky backend's alone
            values.setdefault("start_method", SPEC_START_METHOD)
        timeouts = {role.name: role.timeout for role in self.roles if role.timeout is not None}
        return ParallelRoleConfig(role_timeouts=timeouts, **values)

    def pipeline(self) -> list[Role]:
        """The roles as ``execute_roles_parallel`` takes them: each with its function, params and needs."""
        return pipeline_roles(self.roles)

    def edges(self) -> list[tuple[str, str]]:
        """Each (needed, needing) pair of role names, in role order."""
        return [(need, role.name) for role in self.roles for need in role.needs]


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec; SpecError lists every problem found."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(str(path), [f"cannot read the file: {exc.strerror}"]) from exc
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), [f"not a TOML file: {exc}"]) from exc
    problems: list[str] = []
    for key in sorted(set(document) - {"batch", "roles"}):
        problems.append(f"unknown top-level key {key!r} (expected [batch] and [[roles]])")
    batch = _check_batch(document.get("batch", {}), problems)
    declared = _check_roles(document.get("roles"), path.parent.resolve(), problems)
    roles = expand(declared, batch.get("strict_handoffs") is True, problems)
    if problems:
        raise SpecError(str(path), problems)
    name = batch.pop("name", None) or path.stem
    return Spec(path, content_digest(data), name, batch, tuple(roles))


def _check_batch(table: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        problems.append("[batch] must be a table")
        return {}
    for key in sorted(set(table) - BATCH_KEYS):
        problems.append(f"[batch]: unknown key {key!r}{did_you_mean(key, BATCH_KEYS)}")
    batch = {k: v for k, v in table.items() if k in BATCH_KEYS}
    if "name" in batch and not isinstance(batch["name"], str):
        problems.append(f"[batch]: name must be a string, got {batch['name']!r}")
    keys = spec_keys()
    batch = {keys.get(k, k): v for k, v in batch.items()}  # "scheduler" is the spec's word for dask_address
    if "dask_address" in batch:
        batch.setdefault("backend", "dask")
    try:
        ParallelRoleConfig(**{k: v for k, v in batch.items() if k != "name"})
    except ConfigError as exc:
        problems.append(f"[batch]: {exc}")
    return batch


def _check_roles(roles: Any, folder: Path, problems: list[str]) -> list[Declared]:
    """Every named role, also one with problems of its own (never run then), so that its needs are checked too."""
    if not isinstance(roles, list) or not roles:
        problems.append("no roles: add at least one [[roles]] table")
        return []
    checked = []
    for number, table in enumerate(roles, start=1):
        label = f"role #{number}"
        if not isinstance(table, dict):
            problems.append(f"{label}: must be a table")
            continue
        name = table.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{label}: name must be a non-empty string")
        else:
            label = f"role {name!r}"
        before = len(problems)
        for key in sorted(set(table) - ROLE_KEYS):
            problems.append(f"{label}: unknown key {key!r}{did_you_mean(key, ROLE_KEYS)}")
        _check_target(table, label, folder, problems)
        params = table.get("params", {})
        if not isinstance(params, dict):
            problems.append(f"{label}: params must be a table of keyword arguments")
        timeout = table.get("timeout")
        if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                        and math.isfinite(timeout) and timeout > 0):
            problems.append(f"{label}: timeout must be a number of seconds > 0, got {timeout!r}")
        needs = check_needs(table.get("needs"), label, problems)
        retries, retry_on = _check_retries(table, label, problems)
        version, inputs = _check_key_parts(table, label, folder, problems)
        threads, memory_limit = _check_resources(table, label, problems)
        on_failed_needs = table.get("on_failed_needs", "cancel")
        if on_failed_needs not in ON_FAILED_NEEDS:
            problems.append(f"{label}: on_failed_needs must be one of {', '.join(map(repr, ON_FAILED_NEEDS))}, "
                            f"got {on_failed_needs!r}")
        matrix = check_matrix(table.get("matrix"), params, label, problems)
        if "matrix" in table and "command" in table:
            problems.append(f"{label}: matrix needs a 'call' role (its values are keyword arguments)")
        if isinstance(name, str) and name.strip():
            whole = len(problems) == before
            command = tuple(table["command"]) if "command" in table and whole else None
            call = table.get("call") if whole else None
            role = SpecRole(name, call, command, params if whole else {}, timeout if whole else None, needs,
                            on_failed_needs=on_failed_needs if whole else "cancel",
                            retries=retries if whole else None, retry_on=retry_on if whole else None,
                            version=version, inputs=inputs, threads=threads if whole else None,
                            memory_limit=memory_limit if whole else None)
            checked.append(Declared(role, matrix))
    return checked


def _check_retries(table: dict[str, Any], label: str,
                   problems: list[str]) -> tuple[int | None, tuple[str, ...] | None]:
    """A role's own ``retries`` and ``retry_on``, checked (None: the batch's)."""
    retries, retry_on = table.get("retries"), table.get("retry_on")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
        problems.append(f"{label}: retries must be an integer >= 0, got {retries!r}")
    if retry_on is None:
        return retries, None
    if not isinstance(retry_on, list):
        problems.append(f"{label}: retry_on must be a list, e.g. retry_on = [\"crash\", \"exit:75\"]")
        return retries, None
    try:
        return retries, check_retry_on(retry_on)
    except ValueError as exc:
        problems.append(f"{label}: retry_on: {exc}")
        return retries, None


def _check_resources(table: dict[str, Any], label: str, problems: list[str]) -> tuple[int | None, int | None]:
    """A role's own ``threads`` and ``memory_limit`` (in bytes), checked (None: the batch's)."""
    threads, memory_limit = table.get("threads"), table.get("memory_limit")
    if threads is not None and (problem := threads_error(threads)):
        problems.append(f"{label}: {problem}")
        threads = None
    if memory_limit is not None:
        try:
            memory_limit = bytes_of(memory_limit, "memory_limit")
        except ConfigError as exc:
            problems.append(f"{label}: {exc}")
            memory_limit = None
    return threads, memory_limit


def _check_key_parts(table: dict[str, Any], label: str, folder: Path,
                     problems: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """A role's ``version`` and ``inputs`` (patterns made absolute: beside the spec, wherever it runs from)."""
    version, inputs = table.get("version"), table.get("inputs", [])
    if version is not None and (not isinstance(version, str) or not version):
        problems.append(f"{label}: version must be a non-empty string, got {version!r}")
        version = None
    if not isinstance(inputs, list) or not all(isinstance(p, str) and p for p in inputs):
        problems.append(f"{label}: inputs must be a list of file patterns, e.g. inputs = [\"data/*.csv\"]")
        inputs = []
    return version, tuple(str(folder / pattern) for pattern in inputs)


def _check_target(table: dict[str, Any], label: str, folder: Path, problems: list[str]) -> None:
    has_call, has_command = "call" in table, "command" in table
    if has_call == has_command:
        problems.append(f"{label}: give exactly one of 'call' or 'command'")
    elif has_command:
        command = table["command"]
        if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
            problems.append(f"{label}: command must be a non-empty list of strings")
    else:
        problem = _check_call(table["call"], folder)
        if problem:
            problems.append(f"{label}: {problem}")


def _check_call(call: Any, folder: Path) -> str | None:
    if not isinstance(call, str) or call.count(":") != 1 or not all(call.split(":")):
        return f"call must look like 'module:function', got {call!r}"
    module_name, attribute = call.split(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return f"no module named {module_name!r} (looked beside the spec and on sys.path)"
        return f"module {module_name!r} raised on import: {type(exc).__name__}: {exc}"
    except BaseException as exc:  # noqa: BLE001 - any failure of the user's module is a spec problem
        return f"module {module_name!r} raised on import: {type(exc).__name__}: {exc}"
    if not hasattr(module, attribute):
        return f"module {module_name!r} has no attribute {attribute!r}"
    if not callable(getattr(module, attribute)):
        return f"{call} is not callable"
    return None
