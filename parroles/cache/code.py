"""What a role runs, as a digest that changes when its code does (parent process only).

A function's digest is the SHA-256 of what decides what it does, read from
its code object, never from its source text (so lambdas, closures and
functions typed at a prompt have one too):

- its bytecode, constants (nested code objects recursively: inner functions,
  lambdas, comprehensions), the names it uses and its argument layout; not
  its file name or line numbers, so moving a function does not change it;
- its default arguments and the values its closure cells hold, as canonical
  JSON; a cell holding a function is followed, one holding a module or class
  counts by its name;
- the functions of its own module it calls (found through the global names
  it uses, followed recursively) and the JSON values of the globals it reads
  (``THRESHOLD = 0.5``): a changed helper or constant beside it changes it;
- the functions listed in ``Role(..., cache_includes=[...])``, for helpers
  that live elsewhere.

What it cannot read makes it ``NotReusable`` with the reason, never a
guess: a callable object that is no function, a closure cell holding a
value JSON cannot hold. Globals that are objects of other kinds (a module, a
class, a numpy array) count by name only: their contents are not followed
(list what matters in ``cache_includes`` or give the role a ``version``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

from parroles.digests import canonical_json

_CODE_ATTRIBUTES = ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_names",
                    "co_varnames", "co_freevars", "co_cellvars")
_CONTAINERS = (dict, list, tuple)
_NAMED = (types.ModuleType, type, types.BuiltinFunctionType, types.MethodDescriptorType)


class NotReusable(Exception):
    """A role's cache key cannot be computed: the reason is recorded, and the role always runs."""


def identity(fn: Any) -> str:
    """``module:qualified.name`` of a callable (what ``why`` and the key's parts call it)."""
    fn = getattr(fn, "func", fn)  # a functools.partial: its function
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"


class CodeDigests:
    """Digests of callables, each computed once per object (a batch of 10,000 roles shares a few)."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[Any, str]] = {}  # id -> (the object, kept alive so ids stay unique; digest)
        self._values: dict[int, tuple[Any, str | None]] = {}  # the same for the JSON values globals hold

    def code_part(self, fn: Callable[..., Any], includes: Sequence[Callable[..., Any]] = ()) -> dict[str, Any]:
        """The ``code`` part of a key: the function's name and digest, with each included helper's."""
        part: dict[str, Any] = {"call": identity(fn), "digest": self.digest(fn)}
        if includes:
            part["includes"] = {identity(helper): self.digest(helper) for helper in includes}
        return part

    def digest(self, fn: Any) -> str:
        """The digest of ``fn`` (see the module docstring); NotReusable if its code cannot be read."""
        known = self._done.get(id(fn))
        if known is not None and known[0] is fn:
            return known[1]
        digest = hashlib.sha256(canonical_json(self._describe(fn, set())).encode()).hexdigest()
        self._done[id(fn)] = (fn, digest)
        return digest

    def _describe(self, fn: Any, seen: set[int]) -> Any:
        if isinstance(fn, functools.partial):
            return {"partial": self._describe(fn.func, seen), "args": _json(fn.args, "a partial's arguments"),
                    "keywords": _json(fn.keywords, "a partial's keywords")}
        if isinstance(fn, types.MethodType):
            raise NotReusable(f"{identity(fn)} is a bound method: the state of its object is no part of the key "
                              "(give the role a version)")
        if isinstance(fn, _NAMED):
            return {"named": identity(fn)}
        if not isinstance(fn, types.FunctionType):
            raise NotReusable(f"cannot read the code of {type(fn).__qualname__} object {identity(fn)} "
                              "(not a function: give the role a version)")
        if id(fn) in seen:
            return {"recursive": identity(fn)}  # a helper that calls back: described once
        seen.add(id(fn))
        return {"name": identity(fn), "code": _code(fn.__code__),
                "defaults": _json(fn.__defaults__, "its default arguments"),
                "kwdefaults": _json(fn.__kwdefaults__, "its default keyword arguments"),
                "closure": self._closure(fn, seen), "globals": self._globals(fn, seen)}

    def _closure(self, fn: types.FunctionType, seen: set[int]) -> dict[str, Any]:
        cells = {}
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: a name bound later in the enclosing function
                cells[name] = {"empty": True}
                continue
            cells[name] = self._value(value, seen, f"closure variable {name!r}", strict=True)
        return cells

    def _globals(self, fn: types.FunctionType, seen: set[int]) -> dict[str, Any]:
        found = {}
        for name in sorted(_global_names(fn.__code__)):
            if name in fn.__globals__:
                value = fn.__globals__[name]
                if isinstance(value, functools.partial) or _wraps_own(value, fn):
                    found[name] = self._value(value, seen, f"global {name!r}", strict=True)
                    continue
                same_module = isinstance(value, types.FunctionType) and value.__module__ == fn.__module__
                if same_module or not callable(value):
                    found[name] = self._value(value, seen, f"global {name!r}", strict=False)
        return found

    def _value(self, value: Any, seen: set[int], what: str, *, strict: bool) -> Any:
        if isinstance(value, (types.FunctionType, functools.partial)):
            return self._describe(value, seen)
        wrapped = _unwrapped(value)
        if wrapped is not None:  # functools.lru_cache, cache and the like: the function they wrap
            return {"wraps": self._describe(wrapped, seen)}
        if isinstance(value, _NAMED):
            return {"named": getattr(value, "__name__", repr(value))}
        if isinstance(value, os.PathLike):
            return {"path": os.fspath(value)}
        digest = self._json_digest(value)
        if digest is not None:
            return {"json": digest}
        if strict:
            raise NotReusable(f"{what} holds a {type(value).__qualname__}, which has no canonical JSON (or a dict "
                              "key that is no string) (give the role a version)")
        return {"object": type(value).__qualname__}  # by name only (see the module docstring)

    def _json_digest(self, value: Any) -> str | None:
        """The SHA-256 of ``value``'s canonical JSON (None: it has none), once per object: a large table
        beside a role is read once per batch, not once for each of the closures that reach it."""
        known = self._values.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        try:
            text = canonical_json(value)
            try:
                check_json_keys(value, "it")
            except NotReusable:  # {1: x}: keys told apart by their type and repr, which JSON would not
                text = canonical_json(_typed_keys(value))
            digest: str | None = hashlib.sha256(text.encode()).hexdigest()
        except (TypeError, ValueError, RecursionError):
            digest = None
        self._values[id(value)] = (value, digest)
        return digest


def _unwrapped(value: Any) -> types.FunctionType | None:
    """The function a callable that is no function wraps (``functools.lru_cache``'s ``__wrapped__``), if any."""
    if isinstance(value, (types.FunctionType, type)) or not callable(value):
        return None
    try:
        wrapped = getattr(value, "__wrapped__", None)
    except Exception:  # noqa: BLE001 - an object whose attributes raise wraps nothing we can read
        return None
    return wrapped if isinstance(wrapped, types.FunctionType) else None


def _wraps_own(value: Any, fn: types.FunctionType) -> bool:
    """Whether ``value`` wraps a function of ``fn``'s own module (a decorated helper beside it)."""
    wrapped = _unwrapped(value)
    return wrapped is not None and wrapped.__module__ == fn.__module__


def check_json_keys(value: Any, what: str) -> None:
    """NotReusable if a dict in ``value`` has a key that is no string: JSON would make ``{1: x}`` and
    ``{"1": x}`` (or ``True`` and ``"true"``) one key, and the role would be handed what it was not."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise NotReusable(f"{what} hold a dict with a key that is no string ({key!r}), which JSON "
                                      "cannot tell from a string")
                if isinstance(child, _CONTAINERS):
                    stack.append(child)
        elif isinstance(item, (list, tuple)):
            stack.extend(child for child in item if isinstance(child, _CONTAINERS))


def _typed_keys(value: Any) -> Any:
    """``value`` with each dict as a sorted list of ``[type:repr(key), value]`` pairs."""
    if isinstance(value, dict):
        return {"dict": sorted([f"{type(key).__name__}:{key!r}", _typed_keys(child)] for key, child in value.items())}
    if isinstance(value, (list, tuple)):
        return [_typed_keys(child) for child in value]
    return value


def _code(code: types.CodeType) -> dict[str, Any]:
    described: dict[str, Any] = {"bytecode": code.co_code.hex()}
    table = getattr(code, "co_exceptiontable", b"")  # 3.11+: a try's extent is here, not in the bytecode
    if table:
        described["exceptiontable"] = table.hex()
    for attribute in _CODE_ATTRIBUTES:
        value = getattr(code, attribute)
        described[attribute] = list(value) if isinstance(value, tuple) else value
    described["consts"] = [_constant(const) for const in code.co_consts]
    return described


def _constant(const: Any) -> Any:
    if isinstance(const, types.CodeType):
        return {"code": _code(const)}
    if isinstance(const, frozenset):  # its order follows string hashing, which differs per process
        return {"frozenset": sorted(repr(item) for item in const)}
    if isinstance(const, tuple):
        return {"tuple": [_constant(item) for item in const]}
    return {"repr": f"{type(const).__name__}:{const!r}"}


def _global_names(code: types.CodeType) -> set[str]:
    """The global (and attribute) names a code object and its nested code use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _json(value: Any, what: str) -> Any:
    if value is None:
        return None
    try:
        canonical_json(value)
    except (TypeError, ValueError):
        raise NotReusable(f"{what} hold a value with no canonical JSON (give the role a version)") from None
    check_json_keys(value, what)
    return value
