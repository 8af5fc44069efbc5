"""Helpers for testing roles outside a batch: ``role_context`` gives a role function a context.

    from parroles.testing import role_context

    def test_report_sums_what_succeeded():
        with role_context(inputs={"a": {"loss": 0.1}},
                          failed_needs={"b": FailedNeed("FAILED", "error")}) as ctx:
            assert report() == {...}
        assert ctx.events == [("summary", {...})]

The role runs in the test's own process and thread, as it would in a worker:
``parroles.context()`` answers inside the block and raises ``NoActiveRole``
outside it, as it does outside a batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from parroles import role_context as _ctx
from parroles.errors import EventPayloadError, OutputError
from parroles.results import FailedNeed
from parroles.roles import HandoffToken, RoleName, output_from_json, output_kind, to_finite_json


@dataclasses.dataclass
class TestContext(_ctx.RoleContext):
    """A role's context in a test: what it emitted is kept in ``events``; ``cancel`` tells it to stop."""

    __test__ = False  # not a pytest test class
    events: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None

    def cancel(self, why: str = "cancelled by the test") -> None:
        """From now on ``cancelled()`` is True and ``check_cancelled()`` raises RoleCancelled."""
        self.stop_reason = why


@contextlib.contextmanager
def role_context(role: RoleName = "role", *, inputs: Mapping[str, Any] | None = None,
                 params: Mapping[str, Any] | None = None, failed_needs: Mapping[str, FailedNeed] | None = None,
                 attempt: int = 1, run_id: str | None = None, parent_run_id: str = "test") -> Iterator[TestContext]:
    """Run the block as a role would run in a batch, with the context given.

    ``inputs`` are the needed roles' outputs, handed over through JSON as in a
    batch (a tuple arrives as a list, NaN as None; each also as a ``HandoffToken``
    in ``handoffs``); events emitted are kept as the ledger would hold them,
    after the same JSON check a batch makes (``EventPayloadError``).
    """
    def emit(kind: str, payload: Any) -> None:
        try:
            text, _ = to_finite_json(payload, what=f"event {len(ctx.events) + 1} ({kind!r}): its payload")
        except OutputError as exc:
            raise EventPayloadError(str(exc)) from None
        ctx.events.append((kind, json.loads(text)))  # as the ledger would hold it: a copy, NaN as null

    ctx = TestContext(role, run_id or str(uuid.uuid4()), parent_run_id, attempt, lambda: ctx.stop_reason, emit,
                      params=dict(params or {}), failed_needs=dict(failed_needs or {}))
    for name, output in (inputs or {}).items():
        text, _ = to_finite_json(output, what=f"input {name!r}")  # as a batch hands it over: through JSON
        ctx.inputs[name] = output_from_json(text, output_kind(output))
        ctx.handoffs[name] = HandoffToken.new(ctx.inputs[name], from_role=name)
    token = _ctx._enter(ctx)
    try:
        yield ctx
    finally:
        _ctx._leave(token)
