"""A run's cache key: the SHA-256 of named parts, each recorded, so that ``why`` can say which one changed.

The parts (``runs.cache_parts``, JSON) of a role's run:

- ``role``: its name (a matrix expansion's name holds its family and values);
- ``code``: what it runs: a function's name and digest (``cache.code``) with
  the helpers it lists in ``cache_includes``; a command's argv; or the
  role's ``version``, which stands in for the digest when given;
- ``params``: its keyword arguments, as canonical JSON;
- ``needs``: each role it needs, by the ``output_digest`` of its output (a
  changed upstream output changes every key downstream), or how it ended;
- ``inputs``: its declared file patterns and the content digest of every
  file they match.

``runs.cache_key`` is the SHA-256 of their canonical JSON. A part that has no
canonical form makes the run *not reusable*: no key, and
``cache_parts.not_reusable`` says why.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from parroles.cache.code import CodeDigests, NotReusable, check_json_keys, identity
from parroles.digests import canonical_json

KEY_CODE = "parroles_key_code"  # a callable wrapper (a spec's role) names what it runs through this method
SHORT = 8  # hex digits of a digest ``why`` shows


@dataclasses.dataclass(frozen=True)
class Key:
    """A run's key and its parts (canonical JSON); ``digest`` is None when it is not reusable (the parts say why)."""

    parts_json: str
    digest: str | None

    @property
    def parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = json.loads(self.parts_json)
        return parts

    @property
    def not_reusable(self) -> str | None:
        reason: str | None = self.parts.get("not_reusable")
        return reason


def key_of(name: str, code: Callable[[], str], params: Mapping[str, Any] | None,
           needs: Mapping[str, str | dict[str, str]], inputs: Sequence[str], root: str = ".",
           digests: FileDigests | None = None) -> Key:
    """The key of one run from its parts; ``code`` gives the code part's canonical JSON (or raises NotReusable).

    The parts' text is built from each part's canonical JSON in key order, which is the canonical JSON of
    the whole (``canonical_json`` sorts keys): a key costs a few microseconds, paid by every run.
    """
    texts = {"role": canonical_json(name)}
    try:
        texts["code"] = code()
        if params is not None:
            texts["params"] = _canonical(params, "params")
        if needs:
            texts["needs"] = canonical_json(needs)
        if inputs:
            texts["inputs"] = canonical_json(input_files(inputs, root, digests))
    except NotReusable as exc:
        texts["not_reusable"] = canonical_json(str(exc))
        return Key(_object(texts), None)
    except Exception as exc:  # noqa: BLE001 - a key that cannot be computed never stops the batch: the run runs
        texts["not_reusable"] = canonical_json(f"its key could not be computed: {type(exc).__name__}: {exc}")
        return Key(_object(texts), None)
    text = _object(texts)
    return Key(text, hashlib.sha256(text.encode()).hexdigest())


def _object(texts: Mapping[str, str]) -> str:
    return "{" + ",".join(f'"{name}":{texts[name]}' for name in sorted(texts)) + "}"


def code_part(codes: CodeDigests, fn: Any, version: str | None,
              includes: Sequence[Callable[..., Any]] = ()) -> dict[str, Any]:
    """What a role runs: ``fn`` itself, or what a wrapper (a spec's ``call`` or ``command``) names."""
    named = getattr(fn, KEY_CODE, None)
    target = named() if callable(named) else fn
    if isinstance(target, dict):  # a command: its argv is what it runs
        return target if version is None else {**target, "version": version}
    if version is not None:
        return {"call": identity(target), "version": version}
    return codes.code_part(target, includes)


def _canonical(value: Any, what: str) -> str:
    try:
        text = canonical_json(value)  # tuples become lists, as JSON sees them
    except (TypeError, ValueError) as exc:
        raise NotReusable(f"{what} have no canonical JSON ({exc})") from None
    check_json_keys(value, what)
    return text


class FileDigests:
    """Content digests of files, each read once per batch while it stays as it was (size, mtime, inode).

    As git does for its index, a file changed less than ``SETTLED`` seconds ago is read again every time:
    a write within the clock's granularity could leave its size and mtime as they were.
    """

    SETTLED = 2.0

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def digest(self, path: str) -> str:
        known = self._known.get(path)
        if known is not None and known[0] == _stamp(os.stat(path)):
            return known[1]
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            stamp = _stamp(status)
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if time.time_ns() - max(status.st_mtime_ns, status.st_ctime_ns) > self.SETTLED * 1e9:
            self._known[path] = (stamp, digest)
        return digest


def _stamp(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino


def input_files(patterns: Sequence[str], root: str = ".", digests: FileDigests | None = None) -> dict[str, Any]:
    """The files ``patterns`` match under ``root`` (sorted) and each one's content digest."""
    digests = digests or FileDigests()
    files: dict[str, str] = {}
    for pattern in patterns:
        matched = glob.glob(pattern, root_dir=root, recursive=True)
        if not matched:  # a typo, or a path taken from the wrong folder: the key would not see the file
            raise NotReusable(f"input pattern {pattern!r} matches no file")
        for path in matched:
            full = os.path.join(root, path)
            if os.path.isfile(full):
                try:
                    files[path] = digests.digest(full)
                except OSError as exc:  # gone since the glob, or unreadable: what the role reads is unknown
                    raise NotReusable(f"input {path} could not be read ({exc.strerror or exc})") from None
    return {"patterns": list(patterns), "files": dict(sorted(files.items()))}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two runs' key parts, a line each (``why``); empty when nothing does."""
    lines: list[str] = []
    if old.get("role") != new.get("role"):
        lines.append(f"role {old.get('role')} → {new.get('role')}")
    lines += _code_differences(old.get("code") or {}, new.get("code") or {})
    lines += [f"params{path} {change}" for path, change in _value_differences(old.get("params"), new.get("params"))]
    lines += _need_differences(old.get("needs") or {}, new.get("needs") or {})
    lines += _input_differences(old.get("inputs") or {}, new.get("inputs") or {})
    for side, parts in (("earlier", old), ("this", new)):
        if parts.get("not_reusable"):
            lines.append(f"the {side} run has no key: {parts['not_reusable']}")
    return lines


def _code_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    lines = []
    if old.get("command") != new.get("command"):
        lines.append(f"command {old.get('command')} → {new.get('command')}")
    if old.get("call") != new.get("call"):
        lines.append(f"function {old.get('call')} → {new.get('call')}")
    if old.get("version") != new.get("version"):
        lines.append(f"version {old.get('version')} → {new.get('version')}")
    elif old.get("digest") != new.get("digest") and old.get("call") == new.get("call"):
        lines.append(f"code of {new.get('call')} changed")
    return lines + _compared(old.get("includes") or {}, new.get("includes") or {}, "helper {} added to cache_includes",
                             "helper {} removed from cache_includes", lambda helper, _, __: f"code of {helper} changed")


def _value_differences(old: Any, new: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            child = f"{path}.{key}"
            if key not in old:
                found.append((child, f"added: {_shown(new[key])}"))
            elif key not in new:
                found.append((child, f"removed (was {_shown(old[key])})"))
            else:
                found += _value_differences(old[key], new[key], child)
        return found
    return [] if _shown(old) == _shown(new) else [(path, f"{_shown(old)} → {_shown(new)}")]


def _need_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return _compared(old, new, "needs {} now", "no longer needs {}",
                     lambda need, was, now: f"input from {need} changed: {_need_change(was, now)}")


def _need_change(was: Any, now: Any) -> str:
    if isinstance(was, str) and isinstance(now, str):  # digest a1b2c3d4 → c3d4e5f6
        return f"digest {was[:SHORT]} → {now[:SHORT]}"
    return f"{_need(was)} → {_need(now)}"


def _input_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    lines = []
    if old.get("patterns") != new.get("patterns"):
        lines.append(f"inputs {old.get('patterns') or []} → {new.get('patterns') or []}")
    return lines + _compared(old.get("files") or {}, new.get("files") or {}, "{} is new", "{} is gone",
                             lambda path, _, __: f"{path} changed")


def _compared(old: Mapping[str, Any], new: Mapping[str, Any], added: str, removed: str,
              changed: Callable[[str, Any, Any], str]) -> list[str]:
    """A line for each name only one side has (``added``/``removed``, formatted with it), or whose value differs."""
    lines = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            lines.append(added.format(name))
        elif name not in new:
            lines.append(removed.format(name))
        elif old[name] != new[name]:
            lines.append(changed(name, old[name], new[name]))
    return lines


def _need(value: Any) -> str:
    if isinstance(value, str):
        return f"digest {value[:SHORT]}"
    return f"ended {value.get('status')}" if isinstance(value, dict) else str(value)


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
