"""Pipelines: roles that need other roles, their inputs and verified handoffs, upstream cancellation, bad graphs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import roles_for_tests as R

import parroles
from parroles import (
    Code,
    ConfigError,
    Ledger,
    Plan,
    Reason,
    Review,
    Role,
    RunStatus,
    TestReport,
    Verdict,
    merge_review_and_tests,
)
from parroles.digests import content_digest
from parroles.roles import to_json

WAIT = 30.0


def plan() -> Plan:
    return Plan(["design", "build"], 2)


def code() -> Code:
    planned = parroles.context().inputs["planner"]
    return Code(content_digest(b"patch"), [f"{step}.py" for step in planned.task_breakdown])


def seen() -> dict[str, Any]:
    """What a role was handed: its inputs, and each token's digest after it verified."""
    ctx = parroles.context()
    for token in ctx.handoffs.values():
        token.verify()
    return {"inputs": {name: to_json(value) for name, value in ctx.inputs.items()},
            "digests": {name: token.output_digest for name, token in ctx.handoffs.items()}}


def boom() -> None:
    raise ValueError("planned failure")


def meet(folder: str, me: str, other: str) -> str:
    """Mark that this role started, then wait (bounded) until the other one has too: proof they overlap."""
    Path(folder, me).touch()
    deadline = time.monotonic() + WAIT
    while not Path(folder, other).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{other} never ran beside {me}")
        time.sleep(0.01)
    return me


def test_a_chain_starts_each_role_after_what_it_needs_and_hands_over_outputs(ledger_path):
    batch = parroles.run([Role("coder", code, needs=["planner"]), Role("planner", plan),
                          Role("reviewer", seen, needs=["coder", "planner"])], ledger=ledger_path, max_concurrent=3)
    assert batch.ok and [r.role for r in batch] == ["coder", "planner", "reviewer"]  # the order given
    assert batch.by_role["coder"].output.files_modified == ("design.py", "build.py")
    with Ledger(ledger_path) as ledger:
        runs = {str(r.role): r for r in ledger.list_runs(batch.batch_id)}
    assert runs["planner"].finished_at <= runs["coder"].started_at
    assert runs["coder"].finished_at <= runs["reviewer"].started_at
    handed = batch.by_role["reviewer"].output
    assert handed["digests"] == {"coder": runs["coder"].output_digest, "planner": runs["planner"].output_digest}
    assert handed["inputs"]["planner"] == to_json(plan())


def test_roles_that_need_the_same_role_run_side_by_side(ledger_path, tmp_path):
    folder = str(tmp_path)
    batch = parroles.run([Role("coder", code, needs=["planner"]), Role("planner", plan),
                          Role("reviewer", meet, params={"folder": folder, "me": "reviewer", "other": "tester"},
                               needs=["coder"]),
                          Role("tester", meet, params={"folder": folder, "me": "tester", "other": "reviewer"},
                               needs=["coder"])], ledger=ledger_path, max_concurrent=2)
    assert batch.ok, [(r.role, r.error) for r in batch]


def test_a_failed_need_cancels_its_whole_branch_and_the_other_branch_goes_on(ledger_path):
    batch = parroles.run([Role("bad", boom), Role("after-bad", seen, needs=["bad"]),
                          Role("later", seen, needs=["after-bad"]), Role("planner", plan),
                          Role("coder", code, needs=["planner"])], ledger=ledger_path, max_concurrent=2)
    by = batch.by_role
    assert by["bad"].status is RunStatus.FAILED
    for name in ("after-bad", "later"):
        assert by[name].status is RunStatus.CANCELLED and by[name].reason is Reason.UPSTREAM
        assert by[name].cancelled_by == by["bad"].run_id  # the run that caused it, not the one in between
    assert by["coder"].status is RunStatus.COMPLETED
    with Ledger(ledger_path) as ledger:
        for name in ("after-bad", "later"):
            assert ledger.get_run(by[name].run_id).started_at is None  # never started


def test_fail_fast_still_stops_the_whole_batch(ledger_path):
    batch = parroles.run([Role("bad", boom), Role("after", seen, needs=["bad"]), Role("other", R.echo)],
                         ledger=ledger_path, max_concurrent=1, fail_fast=True)
    assert batch.by_role["after"].reason is Reason.UPSTREAM
    assert batch.by_role["other"].status is RunStatus.CANCELLED and batch.by_role["other"].reason is Reason.FAIL_FAST


def test_each_edge_handed_over_is_a_handoffs_row(ledger_path):
    batch = parroles.run([Role("planner", plan), Role("coder", code, needs=["planner"]),
                          Role("reviewer", seen, needs=["coder", "planner"])], ledger=ledger_path)
    ids = {name: result.run_id for name, result in batch.by_role.items()}
    with Ledger(ledger_path) as ledger:
        rows = ledger.query("SELECT h.from_run_id::VARCHAR, h.to_run_id::VARCHAR, h.output_digest = r.output_digest"
                            " FROM handoffs h JOIN runs r ON r.run_id = h.from_run_id")
    assert sorted(rows) == sorted([(ids["planner"], ids["coder"], True), (ids["coder"], ids["reviewer"], True),
                                   (ids["planner"], ids["reviewer"], True)])


BAD_GRAPHS = {
    "a cycle": ([Role("a", plan, needs=["c"]), Role("b", plan, needs=["a"]), Role("c", plan, needs=["b"])],
                "a cycle: a -> c -> b -> a"),
    "an unknown need": ([Role("a", plan, needs=["nobody"])], "needs 'nobody', which is no role of the batch"),
    "a misspelt need": ([Role("planner", plan), Role("b", plan, needs=["planer"])],
                        "needs 'planer', which is no role of the batch; did you mean 'planner'?"),
    "a role needing itself": ([Role("a", plan, needs=["a"])], "role 'a' needs itself"),
    "duplicate names": ([Role("a", plan), Role("a", code)], "role 'a': duplicate name"),
}


@pytest.mark.parametrize("case", list(BAD_GRAPHS))
def test_a_bad_graph_is_a_config_error_before_anything_runs(ledger_path, case):
    roles, message = BAD_GRAPHS[case]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parroles.run(roles, ledger=ledger_path)
    assert not ledger_path.exists() and not ledger_path.parent.exists()


def test_strict_handoffs_refuse_what_the_standard_vocabulary_forbids(ledger_path):
    with pytest.raises(ConfigError, match="reviewer accepts handoffs from coder, not from planner"):
        parroles.run([Role("planner", plan), Role("reviewer", seen, needs=["planner"])], ledger=ledger_path,
                     strict_handoffs=True)
    allowed = parroles.run([Role("planner", plan), Role("coder", code, needs=["planner"]),
                            Role("my-step", seen, needs=["planner"])], ledger=ledger_path, strict_handoffs=True)
    assert allowed.ok  # the rule holds, and custom names are free


MERGES = [
    (Review(True, [], False), TestReport(True, 3, []), Verdict.APPROVED),
    (Review(True, [], False), TestReport(False, 3, ["t"]), Verdict.CONFLICT),
    (Review(False, ["no"], True), TestReport(False, 3, ["t"]), Verdict.CONFLICT),
    (Review(False, ["fix it"], True), TestReport(True, 3, []), Verdict.REQUIRES_FIX),
    (Review(False, ["meh"], False), TestReport(True, 3, []), Verdict.APPROVED),
]


@pytest.mark.parametrize("review,report,verdict", MERGES)
def test_merging_a_review_with_test_results(review, report, verdict):
    assert merge_review_and_tests(review, report) is verdict


def test_roles_with_their_own_functions_need_no_role_executor_and_mix_with_names(ledger_path):
    mixed = parroles.run(["a", Role("b", lambda: "own"), Role("c", needs=["b"])], R.echo, ledger=ledger_path)
    assert mixed.ok and mixed.by_role["b"].output == "own" and mixed.by_role["c"].output["role"] == "c"
    with pytest.raises(ConfigError, match="role_executor must be callable"):
        parroles.run(["a", Role("b", lambda: "own")], ledger=ledger_path)


def test_expand_names_each_combination_as_toml_writes_it():
    roles = Role("train", seen, params={"epochs": 3}).expand(lr=[0.1, 0.01], seed=[1, 2], opt=["adam"])
    assert [r.name for r in roles] == ['train[lr=0.1,seed=1,opt="adam"]', 'train[lr=0.1,seed=2,opt="adam"]',
                                       'train[lr=0.01,seed=1,opt="adam"]', 'train[lr=0.01,seed=2,opt="adam"]']
    assert roles[2].params == {"epochs": 3, "lr": 0.01, "seed": 1, "opt": "adam"}
    with pytest.raises(ConfigError, match="non-empty list"):
        Role("x", seen).expand(lr=[])
    with pytest.raises(ConfigError, match="expand needs an fn"):
        Role("x").expand(lr=[1])


def test_a_fan_out_and_fan_in(ledger_path):
    fan = Role("fan", lambda seed: seed * seed).expand(seed=list(range(12)))
    total = Role("total", lambda: sum(parroles.context().inputs.values()), needs=[r.name for r in fan])
    batch = parroles.run([Role("root", lambda: 1), *[Role(r.name, r.fn, params=r.params, needs=["root"]) for r in fan],
                          total], ledger=ledger_path, max_concurrent=2)
    assert batch.ok and batch.by_role["total"].output == sum(i * i for i in range(12))


def test_a_pipeline_runs_the_same_on_dask(ledger_path):
    pytest.importorskip("distributed")
    batch = parroles.run([Role("planner", plan), Role("coder", code, needs=["planner"]),
                          Role("bad", boom), Role("after-bad", seen, needs=["bad"])],
                         ledger=ledger_path, backend="dask", max_concurrent=2)
    by = batch.by_role
    assert by["coder"].status is RunStatus.COMPLETED and by["coder"].output.files_modified == ("design.py", "build.py")
    assert by["after-bad"].reason is Reason.UPSTREAM and by["after-bad"].cancelled_by == by["bad"].run_id


def test_workers_get_inputs_as_json_never_pickles(ledger_path):
    """An output is stored and handed as JSON: a tuple comes back as a list on both sides."""
    batch = parroles.run([Role("a", lambda: {"pair": (1, 2)}), Role("b", lambda: parroles.context().inputs["a"],
                                                                   needs=["a"])], ledger=ledger_path)
    assert batch.by_role["b"].output == {"pair": [1, 2]} == batch.by_role["a"].output
    assert os.environ.get("PARROLES_LEDGER") != str(ledger_path)  # the test's own ledger was used


def test_params_need_an_fn_and_a_need_may_name_every_expansion(ledger_path):
    with pytest.raises(ConfigError, match="params are fn's keyword arguments"):
        Role("t", params={"lr": 0.1})
    sweep = Role("train", lambda lr: lr * 10).expand(lr=[1, 2])
    total = Role("total", lambda: sum(parroles.context().inputs.values()), needs=["train"])
    batch = parroles.run([*sweep, total], ledger=ledger_path, max_concurrent=2)
    assert batch.ok and batch.by_role["total"].output == 30


def test_a_role_that_never_started_is_handed_nothing(ledger_path):
    """A handoffs row is an edge handed over: roles that never started (fail-fast) have none."""
    slow_fail = Role("f", lambda: (time.sleep(0.5), boom()))
    batch = parroles.run([Role("x", plan), slow_fail, Role("y", seen, needs=["x"]), Role("z", seen, needs=["x"])],
                         ledger=ledger_path, max_concurrent=1, fail_fast=True)
    never = [r.run_id for r in batch if r.status is RunStatus.CANCELLED]
    with Ledger(ledger_path) as ledger:
        started = {r.run_id for r in ledger.list_runs(batch.batch_id) if r.started_at is not None}
        handed_to = [to for (to,) in ledger.query("SELECT to_run_id::VARCHAR FROM handoffs")]
    assert never and all(to in started for to in handed_to) and not set(never) & set(handed_to)


def lookalike() -> dict[str, Any]:
    """A plain dict shaped like a Plan (no required_state_pointers): a dict, not a Plan, to everyone."""
    return {"kind": "plan", "task_breakdown": ["a", "b"], "estimated_steps": 2}


def what_was_handed() -> dict[str, Any]:
    (need, value), = parroles.context().inputs.items()
    return {"type": type(value).__name__, "value": to_json(value), "need": need}


def test_a_dict_shaped_like_a_typed_output_stays_a_dict_and_hands_off(ledger_path):
    """Issue 20 item 7: a typed output is known by what parroles recorded, never by a dict's shape."""
    batch = parroles.run([Role("planner", lookalike), Role("coder", what_was_handed, needs=["planner"]),
                          Role("typed", plan), Role("reader", what_was_handed, needs=["typed"])],
                         ledger=ledger_path, max_concurrent=2)
    assert batch.ok, [(r.role, r.status, r.error) for r in batch]
    assert batch.by_role["planner"].output == lookalike() and isinstance(batch.by_role["planner"].output, dict)
    assert batch.by_role["coder"].output == {"type": "dict", "value": to_json(lookalike()), "need": "planner"}
    assert batch.by_role["typed"].output == plan()
    assert batch.by_role["reader"].output == {"type": "Plan", "value": to_json(plan()), "need": "typed"}
    with Ledger(ledger_path) as ledger:
        runs = {str(r.role): r for r in ledger.list_runs(batch.batch_id)}
        kinds = dict(ledger.query("SELECT role, output_kind FROM runs"))
    assert runs["planner"].output == lookalike() and runs["typed"].output == plan()
    assert kinds == {"planner": None, "coder": None, "typed": "plan", "reader": None}
    assert runs["planner"].output_digest == content_digest(to_json(lookalike()).encode())


# -- issue 21: non-finite numbers, fan-ins over what succeeded, what a run was given -----------


def train(lr: float) -> dict[str, Any]:
    parroles.context().emit("curve", {"points": [1.0, lr * float("inf")]})
    return {"loss": float("nan") if lr > 1 else lr / 10, "lr": lr}


def report() -> dict[str, Any]:
    ctx = parroles.context()
    return {"inputs": {name: json.loads(to_json(value)) for name, value in ctx.inputs.items()},
            "failed": {name: [need.status, need.reason] for name, need in ctx.failed_needs.items()}}


def test_a_diverged_sweep_point_is_recorded_with_null_and_its_fan_in_runs(ledger_path):
    """Issue 21 item 3: NaN is data: the run COMPLETED, null stored, a nonfinite event says where."""
    roles = [*Role("train", train).expand(lr=[0.5, 5.0]), Role("report", report, needs=["train"])]
    batch = parroles.run(roles, ledger=ledger_path)
    assert batch.ok, [(r.role, r.error) for r in batch]
    assert batch.by_role["train[lr=5.0]"].output == {"loss": None, "lr": 5.0}
    assert batch.by_role["report"].output["inputs"]["train[lr=5.0]"] == {"loss": None, "lr": 5.0}
    with Ledger(ledger_path) as ledger:
        run = batch.by_role["train[lr=5.0]"]
        events = [(e.kind, e.payload) for e in ledger.get_events(run.run_id)]
        (stored,) = ledger.query("SELECT output::VARCHAR FROM runs WHERE run_id = ?::UUID", [run.run_id])[0]
    assert stored == '{"loss":null,"lr":5.0}'
    assert events == [("curve", {"points": [1.0, None]}), ("nonfinite", {"where": "event", "seq": 1,
                                                                         "paths": ["$.points[1]"]}),
                      ("nonfinite", {"where": "output", "paths": ["$.loss"]})]


def test_a_fan_in_with_on_failed_needs_run_runs_over_what_succeeded(ledger_path):
    """Issue 21 item 4: its inputs hold the completed needs, failed_needs the others; other roles as before."""
    roles = [Role("good", plan), Role("bad", boom), Role("skipped", plan, needs=["bad"]),
             Role("summary", report, needs=["good", "bad", "skipped"], on_failed_needs="run"),
             Role("after", seen, needs=["summary"]), Role("strict", plan, needs=["bad"])]
    batch = parroles.run(roles, ledger=ledger_path, max_concurrent=2)
    status = {str(r.role): (r.status, r.reason) for r in batch}
    assert status["summary"] == (RunStatus.COMPLETED, None) and status["after"] == (RunStatus.COMPLETED, None)
    assert status["skipped"] == (RunStatus.CANCELLED, Reason.UPSTREAM) and status["strict"][1] is Reason.UPSTREAM
    summary = batch.by_role["summary"].output
    assert summary == {"inputs": {"good": plan().to_dict()},
                       "failed": {"bad": ["FAILED", "error"], "skipped": ["CANCELLED", "upstream"]}}
    assert batch.by_role["skipped"].cancelled_by == batch.by_role["bad"].run_id
    with Ledger(ledger_path) as ledger:
        handed = ledger.query("SELECT count(*) FROM handoffs WHERE to_run_id = ?::UUID", [batch.by_role["summary"].run_id])
    assert handed == [(1,)]


def test_on_failed_needs_is_checked(ledger_path):
    with pytest.raises(ConfigError, match="on_failed_needs must be one of 'cancel', 'run'"):
        Role("x", plan, on_failed_needs="ignore")


def test_what_each_run_was_given_is_queryable(ledger_path):
    """Issue 21 item 5: params (matrix values included), the matrix family, and when its needs were met."""
    roles = [*Role("train", train).expand(lr=[0.1, 0.2]),
             Role("report", report, needs=["train"]), "plain"]
    batch = parroles.run(roles, lambda role, run_id: role, ledger=ledger_path)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        rows = {role: rest for role, *rest in ledger.query(
            "SELECT role, params, matrix_of, ready_at = queued_at, ready_at >= queued_at, ready_at <= started_at"
            " FROM runs")}
    assert rows["train[lr=0.1]"] == ['{"lr":0.1}', "train", True, True, True]
    assert rows["report"][:2] == ["{}", None] and rows["report"][2:] == [False, True, True]
    assert rows["plain"][:2] == [None, None]


def test_expand_refuses_an_axis_that_is_also_a_param():
    with pytest.raises(ConfigError, match="'lr' is both a matrix axis and a param"):
        Role("train", train, params={"lr": 1.0}).expand(lr=[0.1])
