"""Retries (issue 23): a transient failure costs one more attempt, not the batch, and every attempt is a run."""

from __future__ import annotations

import os
import random
import time

import pytest
import roles_for_tests as R
from conftest import run_roles
from test_batch_unit import NOW, make_batch

import parroles
from parroles import Ledger, ParallelRoleConfig, Reason, Retry, Role, RunStatus
from parroles.backends.protocol import Finished, LossCause, Lost, Outcome, OutcomeStatus, Started
from parroles.results import ErrorInfo, Failure, RetryPolicy, should_retry
from parroles.runner.lifecycle import RunState
from parroles.runner.retries import delay_before

FAST = {"retry_delay": 0.05, "retry_jitter": 0.0}  # the schedule is tested below, on a clock of its own


# -- the policy, on its own ------------------------------------------------------------------


def test_the_delay_backs_off_is_jittered_within_bounds_and_capped():
    policy = RetryPolicy(retries=5, delay=1.0, backoff=2.0, jitter=0.1, max_delay=5.0)
    rng = random.Random(7)
    delays = [delay_before(policy, attempt, Failure(Reason.CRASH), rng) for attempt in range(1, 6)]
    for attempt, delay in enumerate(delays, start=1):
        base = min(2.0 ** (attempt - 1), 5.0 / 1.1)
        assert base * 0.9 <= delay <= min(base * 1.1, 5.0)
    assert delays[-1] == 5.0  # 16 s, capped
    assert delay_before(policy, 1, Failure(Reason.ERROR, asked_after=0.25), rng) == 0.25


def test_what_earns_another_attempt():
    policy = RetryPolicy(retries=2, on=("crash", "ConnectionError", "exit:75"))
    assert should_retry(policy, 1, Failure(Reason.CRASH))
    assert not should_retry(policy, 3, Failure(Reason.CRASH))  # no attempts left
    assert not should_retry(policy, 1, Failure(Reason.TIMEOUT))
    refused = ("ConnectionRefusedError", "builtins.ConnectionRefusedError", "ConnectionError", "OSError")
    assert should_retry(policy, 1, Failure(Reason.ERROR, refused))  # a subclass of a named type
    assert not should_retry(policy, 1, Failure(Reason.ERROR, ("ValueError", "Exception")))
    assert should_retry(policy, 1, Failure(Reason.ERROR, ("parroles.CommandFailed",), exit_code=75))
    assert should_retry(policy, 1, Failure(Reason.ERROR, ("parroles.Retry",), asked_after=-1.0))  # whatever on says
    assert not should_retry(RetryPolicy(retries=0), 1, Failure(Reason.CRASH))


def test_a_retry_waits_out_its_delay_on_the_loops_clock_holding_no_slot():
    batch, writer = make_batch(["flaky", "other"], max_concurrent=1, retries=1, retry_delay=2.0, retry_jitter=0.0)
    (first,) = [task for chunk in batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0) for task in chunk]
    batch.started(Started(first.dispatch_id, 1, "h", time.time()), NOW)
    batch.lost(Lost(first.dispatch_id, LossCause.CRASH, "worker process (pid 1) died: SIGKILL(-9)"), NOW + 1)
    retry = batch.runs[0]
    assert retry.state is RunState.BACKING_OFF and retry.number == 2 and retry.retry_of == first.run_id
    assert batch.seconds_to_next_deadline(NOW + 1) == 2.0
    (second,) = [task for chunk in batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0) for task in chunk]
    assert second.role == "other"  # the slot went to another role meanwhile
    assert batch.due(NOW + 2.9) == [] and retry.state is RunState.BACKING_OFF
    batch.due(NOW + 3.0)
    assert retry.state is RunState.READY
    batch.finished(Finished(second.dispatch_id, Outcome(OutcomeStatus.COMPLETED, "1", duration_ms=1.0)), NOW + 3)
    (third,) = [task for chunk in batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0) for task in chunk]
    assert (third.run_id, third.attempt) == (retry.run_id, 2)
    batch.started(Started(third.dispatch_id, 1, "h", time.time()), NOW + 3)
    batch.finished(Finished(third.dispatch_id, Outcome(OutcomeStatus.COMPLETED, "2", duration_ms=1.0)), NOW + 4)
    flaky, other = batch.results()
    assert (flaky.status, flaky.attempt, flaky.attempts) == (RunStatus.COMPLETED, 2, (first.run_id, retry.run_id))
    assert writer.runs[first.run_id]["status"] is RunStatus.FAILED and not batch.unfinished


def test_a_cancel_during_a_delay_cancels_the_pending_attempt_at_once():
    batch, writer = make_batch(["flaky"], retries=3, retry_delay=30.0)
    (task,) = [task for chunk in batch.chunks_to_dispatch(lookahead=0, max_chunk=1, now=0.0) for task in chunk]
    batch.started(Started(task.dispatch_id, 1, "h", time.time()), NOW)
    error = ErrorInfo("builtins.ValueError", "no")
    outcome = Outcome(OutcomeStatus.FAILED, error=error, error_types=("ValueError",), retry_after=-1.0)
    batch.finished(Finished(task.dispatch_id, outcome), NOW)
    assert batch.unfinished and batch.runs[0].state is RunState.BACKING_OFF
    batch.cancel(Reason.INTERRUPTED, NOW + 1, detail="SIGINT received")
    (result,) = batch.results()
    assert (result.status, result.reason, result.attempt) == (RunStatus.CANCELLED, Reason.INTERRUPTED, 2)
    assert not batch.unfinished and batch.seconds_to_next_deadline(NOW + 1) is None


# -- whole batches -----------------------------------------------------------------------------


def flaky(failures: int, exc: str = "ConnectionError") -> int:
    """Fails its first ``failures`` attempts with ``exc``, then returns its attempt number."""
    attempt = parroles.context().attempt
    if attempt <= failures:
        raise {"ConnectionError": ConnectionRefusedError, "ValueError": ValueError}[exc](f"attempt {attempt}")
    return attempt


def crash_once() -> int:
    if parroles.context().attempt == 1:
        os._exit(3)
    return parroles.context().attempt


def slow_once() -> int:
    if parroles.context().attempt == 1:
        time.sleep(60)
    return parroles.context().attempt


def asks() -> int:
    if parroles.context().attempt == 1:
        raise Retry("the share is busy", after=0.05)
    return parroles.context().attempt


def test_every_attempt_is_a_run_and_the_role_ends_with_its_last(ledger_path):
    roles = [Role("flaky", flaky, params={"failures": 2}, retries=2, retry_on=["ConnectionError"]),
             Role("crash", crash_once, retries=1), Role("slow", slow_once, retries=1, timeout=0.5),
             Role("asks", asks, retries=1, retry_on=[]), Role("after", lambda: "ran", needs=["flaky"])]
    batch = parroles.run(roles, ledger=ledger_path, cancel_grace=0.2, **FAST)
    assert batch.ok, [(r.role, r.status, r.error) for r in batch]
    assert [(str(r.role), r.attempt, len(r.attempts)) for r in batch] == [
        ("flaky", 3, 3), ("crash", 2, 2), ("slow", 2, 2), ("asks", 2, 2), ("after", 1, 1)]
    assert batch.by_role["flaky"].output == 3
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs(batch.batch_id)
        flaky_runs = [r for r in runs if str(r.role) == "flaky"]
        after = next(r for r in runs if str(r.role) == "after")
    assert [(r.attempt, r.status, r.reason) for r in flaky_runs] == [
        (1, RunStatus.FAILED, Reason.ERROR), (2, RunStatus.FAILED, Reason.ERROR), (3, RunStatus.COMPLETED, None)]
    assert [r.retry_of for r in flaky_runs] == [None, flaky_runs[0].run_id, flaky_runs[1].run_id]
    assert [r.run_id for r in flaky_runs] == list(batch.by_role["flaky"].attempts)
    assert after.started_at >= flaky_runs[-1].finished_at  # it waited for the last attempt
    reasons = {str(r.role): [x.reason for x in runs if x.role == r.role] for r in batch}
    assert reasons["crash"] == [Reason.CRASH, None] and reasons["slow"] == [Reason.TIMEOUT, None]


def test_no_retry_for_what_retry_on_does_not_name_and_exhaustion_keeps_the_last_error(run_batch, ledger_path):
    roles = [Role("other", flaky, params={"failures": 5, "exc": "ValueError"}, retries=3,
                  retry_on=["ConnectionError"]),
             Role("always", flaky, params={"failures": 5}, retries=2, retry_on=["OSError"])]
    batch = parroles.run(roles, ledger=ledger_path, **FAST)
    other, always = batch
    assert (other.status, other.attempt, other.error.type) == (RunStatus.FAILED, 1, "ValueError")
    assert (always.status, always.attempt, len(always.attempts)) == (RunStatus.FAILED, 3, 3)
    assert always.error.message == "attempt 3"
    with Ledger(ledger_path) as ledger:
        assert len(ledger.list_runs(batch.batch_id)) == 4


def test_fail_fast_waits_for_the_last_attempt(run_batch, tmp_path):
    results, _ = run_batch(["fail", "polite"], R.crash_table, max_concurrent=2, fail_fast=True,
                           retries=1, retry_on=("error",), cancel_grace=5, **FAST)
    fail, polite = results
    assert (fail.status, fail.attempt) == (RunStatus.FAILED, 2)  # retried once before fail-fast
    assert polite.status is RunStatus.CANCELLED and polite.reason is Reason.FAIL_FAST
    assert polite.cancelled_by == fail.run_id


@pytest.mark.parametrize("retries", [0])
def test_a_batch_without_retries_records_one_attempt(run_batch, retries):
    results, _ = run_batch(["fail"], R.crash_table, retries=retries)
    assert results[0].attempts == (results[0].run_id,)


def test_retries_on_dask_make_the_crashed_attempt_a_run_of_its_own(ledger_path, dask_address):
    results, batch_id = run_roles(ledger_path, [Role("crash", crash_once, retries=1)], None, backend="dask",
                                  dask_address=dask_address, **FAST)
    (crash,) = results
    assert (crash.status, crash.attempt, crash.output) == (RunStatus.COMPLETED, 2, 2)
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs(batch_id)
    assert [(r.attempt, r.status, r.reason) for r in runs] == [(1, RunStatus.FAILED, Reason.CRASH),
                                                                (2, RunStatus.COMPLETED, None)]


def test_the_config_and_a_spec_take_the_policy_and_refuse_nonsense():
    assert ParallelRoleConfig(retries=2, retry_on=["crash", "exit:75"]).retry_on == ("crash", "exit:75")
    for bad in ({"retries": -1}, {"retry_on": "crash"}, {"retry_on": ["exit:x"]}, {"retry_jitter": 2}):
        with pytest.raises(parroles.ConfigError):
            ParallelRoleConfig(**bad)
    with pytest.raises(parroles.ConfigError, match="retry_on"):
        Role("x", flaky, retry_on=["not a name"])


def test_a_retried_command_role_on_the_command_line(tmp_path):
    """A command that exits 75 once (retry_on exit:75): both attempts in runs, linked both ways by show."""
    import json

    from click.testing import CliRunner

    from parroles.cli import cli

    marker, ledger = tmp_path / "tried", tmp_path / "l.duckdb"
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[batch]
name = "retrying"
retry_delay = 0.05
[[roles]]
name = "fetch"
command = ["sh", "-c", "test -f {marker} || {{ touch {marker}; exit 75; }}"]
retries = 2
retry_on = ["exit:75"]
""")
    ran = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(ledger), "--json"])
    assert ran.exit_code == 0, ran.output
    (fetch,) = json.loads(ran.output)["results"]
    assert fetch["attempt"] == 2 and len(fetch["attempts"]) == 2
    runs = json.loads(CliRunner().invoke(cli, ["runs", "--role", "fetch", "--ledger", str(ledger), "--json"]).output)
    by_attempt = {run["attempt"]: run for run in runs}
    assert by_attempt[1]["status"] == "FAILED" and by_attempt[2]["retry_of"] == by_attempt[1]["run_id"]
    first = CliRunner().invoke(cli, ["show", by_attempt[1]["run_id"], "--ledger", str(ledger), "--json"])
    assert json.loads(first.output)["retried_as"] == by_attempt[2]["run_id"]
    shown = CliRunner().invoke(cli, ["show", by_attempt[1]["run_id"], "--ledger", str(ledger)]).output
    assert f"retried as: {by_attempt[2]['run_id']}" in shown
    summary = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(ledger)]).output
    assert "COMPLETED" in summary  # the marker is there now: one attempt


def test_the_trace_draws_each_attempt(ledger_path, tmp_path):
    from parroles.ledger.export import batch_trace

    batch = parroles.run([Role("flaky", flaky, params={"failures": 1}, retries=1, retry_on=["OSError"])],
                         ledger=ledger_path, **FAST)
    with Ledger(ledger_path) as ledger:
        slices = [e["name"] for e in batch_trace(ledger, batch.batch_id)["traceEvents"] if e.get("ph") == "X"
                  and e.get("pid") == 1]
    assert slices == ["flaky", "flaky (attempt 2)"]


def fails_plainly(folder: str) -> None:
    time.sleep(0.3)
    raise ValueError("not a crash")


def counts(folder: str, name: str) -> str:
    open(os.path.join(folder, name), "w").close()
    return name


def test_fail_fast_is_as_quick_when_the_failure_is_not_one_to_retry(ledger_path, tmp_path):
    """Found by breaking retries: with attempts left, a failure retry_on does not name let queued roles start."""
    roles = [Role("bad", fails_plainly, params={"folder": str(tmp_path)}),
             *[Role(f"q{i}", counts, params={"folder": str(tmp_path), "name": f"q{i}"}) for i in range(6)]]
    batch = parroles.run(roles, ledger=ledger_path, max_concurrent=1, fail_fast=True, retries=2, retry_on=["crash"])
    assert batch[0].status is RunStatus.FAILED and batch[0].attempt == 1
    assert {r.status for r in batch[1:]} == {RunStatus.CANCELLED} and os.listdir(tmp_path) == ["ledger"]


def test_a_bad_after_is_the_roles_own_error_and_a_huge_backoff_is_capped():
    with pytest.raises(ValueError, match="after"):
        Retry("x", after="abc")
    for bad in (-5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            Retry("x", after=bad)
    policy = RetryPolicy(retries=2000, delay=1.0, backoff=1e100, max_delay=0.05)
    assert delay_before(policy, 1500, Failure(Reason.ERROR), random.Random(1)) <= 0.05
