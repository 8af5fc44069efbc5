"""``parroles.testing``: a role function tested outside a batch, with the context it would have in one."""

from __future__ import annotations

from typing import Any

import pytest

import parroles
from parroles import FailedNeed, NoActiveRole, Plan, RoleCancelled, context
from parroles.testing import role_context


def summarise() -> dict[str, Any]:
    ctx = context()
    ctx.emit("seen", {"inputs": sorted(ctx.inputs)})
    return {"steps": ctx.inputs["planner"].estimated_steps, "failed": sorted(ctx.failed_needs),
            "attempt": ctx.attempt, "lr": ctx.params.get("lr")}


def test_a_role_runs_under_a_context_given_by_the_test():
    plan = Plan(["a"], 3)
    with role_context("summary", inputs={"planner": plan}, params={"lr": 0.1}, attempt=2,
                      failed_needs={"tester": FailedNeed("FAILED", "timeout")}) as ctx:
        assert summarise() == {"steps": 3, "failed": ["tester"], "attempt": 2, "lr": 0.1}
        ctx.handoffs["planner"].verify()
    assert ctx.events == [("seen", {"inputs": ["planner"]})]
    with pytest.raises(NoActiveRole):
        context()  # outside the block, as outside a batch


def test_a_test_can_tell_the_role_to_stop_and_payloads_are_checked_as_in_a_batch():
    with role_context() as ctx:
        assert not context().cancelled()
        ctx.cancel()
        with pytest.raises(RoleCancelled):
            context().check_cancelled()
        with pytest.raises(parroles.EventPayloadError):
            context().emit("bad", {"x": object()})


def test_a_roles_params_are_in_its_context_in_a_batch_too(ledger_path):
    batch = parroles.run([parroles.Role("p", lambda lr: context().params, params={"lr": 0.5})], ledger=ledger_path)
    assert batch[0].output == {"lr": 0.5}


def test_what_a_test_context_keeps_is_what_a_batch_would():
    """Found by breaking issue 21: events were kept by reference, inputs raw (tuples, NaN)."""
    payload = {"curve": [1.0, float("nan")]}
    with role_context(inputs={"train": {"points": (1, 2), "loss": float("nan")}}) as ctx:
        context().emit("fit", payload)
        payload["curve"].append(99)
        assert ctx.inputs["train"] == {"points": [1, 2], "loss": None}
    assert ctx.events == [("fit", {"curve": [1.0, None]})]
