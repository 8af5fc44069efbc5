"""Turning results into handoff tokens."""

from __future__ import annotations

from parroles.errors import ParrolesError
from parroles.results import RoleRunResult
from parroles.roles import HandoffToken


def token_from_result(result: RoleRunResult) -> HandoffToken:
    """The handoff token of a completed result; ParrolesError for a result without output."""
    if not result.success or result.output is None:
        raise ParrolesError(f"run {result.run_id} ({result.status.value}) has no output to hand off")
    return HandoffToken.new(result.output, from_role=result.role)
