"""The role vocabulary: the standard roles, their typed outputs and handoff tokens.

Each typed output is a frozen dataclass with a ``kind``; the role that
produces it follows from the kind. Outputs travel and are stored as
canonical JSON (sorted keys, compact separators, ``kind`` included), so the
same output has the same SHA-256 digest in every process.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import uuid
from typing import Any, ClassVar

from parroles.digests import canonical_json, content_digest, validate_digest
from parroles.errors import ConfigError, InvalidHandoffToken, OutputError


class AgentRole(str, enum.Enum):
    """The standard roles. Anywhere a role is accepted, a custom name works too."""

    PLANNER = "planner"
    CODER = "coder"
    REVIEWER = "reviewer"
    TESTER = "tester"
    FIXER = "fixer"

    def __str__(self) -> str:
        return self.value


RoleName = AgentRole | str
_STANDARD_ROLES: dict[str, AgentRole] = {role.value: role for role in AgentRole}


def role_name(role: RoleName) -> str:
    """The plain string naming a role, standard or custom; rejects empty names."""
    name = role.value if isinstance(role, AgentRole) else role
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a role must be an AgentRole or a non-empty string, got {role!r}")
    return plain_str(name)


def plain_str(text: str) -> str:
    """``text`` as an exact ``str``, fit to store: a subclass (a StrEnum member, say) is not a plain value,
    and text that is not valid Unicode (a lone surrogate) cannot be stored at all (ConfigError)."""
    plain = str.__str__(text)
    try:
        plain.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{plain!r} is not valid Unicode text (it holds a lone surrogate)") from None
    return plain


def as_role(name: str) -> RoleName:
    """The AgentRole for a standard name, else the custom name itself."""
    # A dict lookup: AgentRole(name) raises and catches a ValueError for every custom name (5 us, on the path
    # of every role in the parent and in its worker).
    return _STANDARD_ROLES.get(name, name)


# Who accepts handoffs from whom in the standard pipeline (planner -> coder -> reviewer | tester -> fixer).
ACCEPTS_FROM: dict[AgentRole, frozenset[AgentRole]] = {
    AgentRole.PLANNER: frozenset(),
    AgentRole.CODER: frozenset({AgentRole.PLANNER, AgentRole.FIXER}),
    AgentRole.REVIEWER: frozenset({AgentRole.CODER}),
    AgentRole.TESTER: frozenset({AgentRole.CODER, AgentRole.FIXER}),
    AgentRole.FIXER: frozenset({AgentRole.REVIEWER, AgentRole.TESTER}),
}

@dataclasses.dataclass(frozen=True)
class _Output:
    kind: ClassVar[str]
    role: ClassVar[AgentRole]

    def producing_role(self) -> AgentRole:
        return self.role

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **fields}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class Plan(_Output):
    kind: ClassVar[str] = "plan"
    role: ClassVar[AgentRole] = AgentRole.PLANNER
    task_breakdown: tuple[str, ...]
    estimated_steps: int
    required_state_pointers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _freeze(self, "task_breakdown", "required_state_pointers")
        for pointer in self.required_state_pointers:
            if pointer and not pointer.startswith("/"):
                raise ValueError(f"not an RFC 6901 JSON pointer: {pointer!r}")


@dataclasses.dataclass(frozen=True)
class Code(_Output):
    kind: ClassVar[str] = "code"
    role: ClassVar[AgentRole] = AgentRole.CODER
    patch_digest: str
    files_modified: tuple[str, ...]
    notes: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "files_modified")
        validate_digest(self.patch_digest)


@dataclasses.dataclass(frozen=True)
class Review(_Output):
    kind: ClassVar[str] = "review"
    role: ClassVar[AgentRole] = AgentRole.REVIEWER
    approved: bool
    comments: tuple[str, ...]
    requires_fix: bool

    def __post_init__(self) -> None:
        _freeze(self, "comments")


@dataclasses.dataclass(frozen=True)
class TestReport(_Output):
    __test__ = False  # not a pytest test class
    kind: ClassVar[str] = "test_report"
    role: ClassVar[AgentRole] = AgentRole.TESTER
    passed: bool
    total_cases: int
    failed_cases: tuple[str, ...]
    diagnostic_digest: str | None = None

    def __post_init__(self) -> None:
        _freeze(self, "failed_cases")
        if self.diagnostic_digest is not None:
            validate_digest(self.diagnostic_digest)


@dataclasses.dataclass(frozen=True)
class Fix(_Output):
    kind: ClassVar[str] = "fix"
    role: ClassVar[AgentRole] = AgentRole.FIXER
    patch_digest: str
    resolved_issues: tuple[str, ...]

    def __post_init__(self) -> None:
        _freeze(self, "resolved_issues")
        validate_digest(self.patch_digest)


def _freeze(output: _Output, *names: str) -> None:
    # Lists given by callers become tuples, so outputs stay hashable and immutable.
    for name in names:
        object.__setattr__(output, name, tuple(getattr(output, name)))


RoleOutput = Plan | Code | Review | TestReport | Fix
OUTPUT_TYPES: dict[str, type[_Output]] = {cls.kind: cls for cls in (Plan, Code, Review, TestReport, Fix)}


def to_json(output: Any, what: str = "output") -> str:
    """Canonical JSON of a typed output (kind-tagged) or of any JSON value; OutputError if it has none.

    The text is valid UTF-8 too: a lone surrogate in a string is refused here, not when it is stored.
    ``what`` names the value in the error.
    """
    value = output.to_dict() if isinstance(output, _Output) else output
    try:
        text = canonical_json(value)
        text.encode()
    except UnicodeEncodeError as exc:
        raise OutputError(f"{what} holds text that is not valid Unicode ({exc.reason}: "
                          f"{exc.object[exc.start:exc.end]!r})") from exc
    except (TypeError, ValueError) as exc:
        raise OutputError(f"{what} is not JSON-serialisable: {exc}") from exc
    return text


def to_finite_json(output: Any, what: str = "output") -> tuple[str, list[str]]:
    """``to_json``, with NaN and infinities stored as ``null``; also the JSONPaths where they were.

    A diverged loss is data, not a reason to lose the run: JSON has no NaN,
    so it becomes ``null`` and the paths say where (``$.loss``, ``$.curve[3]``).
    """
    try:
        return to_json(output, what), []
    except OutputError:
        finite, paths = without_nonfinite(output.to_dict() if isinstance(output, _Output) else output)
        if not paths:
            raise
        return to_json(finite, what), paths


def without_nonfinite(value: Any) -> tuple[Any, list[str]]:
    """``value`` with each NaN or infinity replaced by None, and the JSONPaths where they were."""
    paths: list[str] = []
    return _finite(value, "$", paths), paths


def _finite(value: Any, path: str, paths: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        paths.append(path)
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{path}{_member(key)}", paths) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item, f"{path}[{index}]", paths) for index, item in enumerate(value)]
    return value


def _member(key: Any) -> str:
    text = str(key)
    return f".{text}" if text.isidentifier() else f"[{json.dumps(text, ensure_ascii=False)}]"


def output_kind(output: Any) -> str | None:
    """The ``kind`` of a typed output, recorded beside its JSON; None for any other value."""
    return output.kind if isinstance(output, _Output) else None


def output_from_json(text: str, kind: str | None = None) -> Any:
    """Decode stored output JSON: the typed output of ``kind`` when one was recorded, else the plain value.

    Only the recorded kind makes a typed output, never the value's shape: a
    role that returned a dict that looks like a ``Plan`` gets back its dict.
    """
    if text == "null":  # what most roles return, read at every run's end
        return None
    value = json.loads(text)
    cls = OUTPUT_TYPES.get(kind) if kind is not None else None
    if cls is None or not isinstance(value, dict):
        return value
    return cls(**{k: v for k, v in value.items() if k != "kind"})


@dataclasses.dataclass(frozen=True)
class HandoffToken:
    """An output handed from one role to the next, sealed by its digest."""

    token_id: str
    from_role: RoleName
    output: Any
    output_digest: str

    @classmethod
    def new(cls, output: Any, from_role: RoleName | None = None) -> HandoffToken:
        if from_role is None:
            if not isinstance(output, _Output):
                raise ValueError("from_role is required for an output that is not a typed output")
            from_role = output.producing_role()
        digest = content_digest(to_json(output).encode())
        return cls(str(uuid.uuid4()), from_role, output, digest)

    def verify(self) -> None:
        """Raise InvalidHandoffToken unless the output still has the sealed digest."""
        actual = content_digest(to_json(self.output).encode())
        if actual != self.output_digest:
            raise InvalidHandoffToken(
                f"token {self.token_id}: output digest {actual} does not match {self.output_digest}"
            )
