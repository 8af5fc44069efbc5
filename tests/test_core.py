"""The core executor: the seed's parallel-execution suite, ported, and the fixes of its weaknesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import roles_for_tests as R
from conftest import SPEC_DIGEST

import parroles
from parroles import (
    AgentRole,
    ConfigError,
    HandoffToken,
    ImmutableRunError,
    InvalidHandoffToken,
    Ledger,
    LedgerError,
    NoActiveRole,
    ParallelExecutionFailed,
    ParallelRoleConfig,
    ParrolesError,
    Reason,
    RunStatus,
    context,
    execute_roles_parallel,
    token_from_result,
)
from parroles.digests import canonical_json, content_digest

ALL_ROLES = list(AgentRole)


# -- ported from the seed's suite ---------------------------------------------------------


def test_each_role_gets_an_isolated_run(run_batch, ledger_path):
    results, batch_id = run_batch(ALL_ROLES, R.echo, max_concurrent=3)
    assert [r.role for r in results] == ALL_ROLES
    assert len({r.run_id for r in results}) == len(ALL_ROLES)
    with Ledger(ledger_path) as ledger:
        for result in results:
            record = ledger.get_run(result.run_id)
            assert record.parent_run_id == batch_id
            assert record.role == result.role
            assert record.metadata["agent_name"] == f"role:{result.role.value}"
            assert record.metadata["tags"] == {"parent_run_id": batch_id, "role": result.role.value}
            assert record.spec_digest == SPEC_DIGEST
            assert record.output == {"role": result.role.value, "run_id": result.run_id, "pid": record.worker_pid}


def test_no_shared_ledger_state_between_roles(run_batch, ledger_path):
    results, _ = run_batch(["a", "b", "c"], R.emit_many, max_concurrent=3)
    with Ledger(ledger_path) as ledger:
        for result in results:
            events = ledger.get_events(result.run_id)
            assert {e.payload["role"] for e in events} == {result.role}


def test_all_roles_failing_raises_with_every_result(ledger_path):
    with pytest.raises(ParallelExecutionFailed) as info:
        execute_roles_parallel(ledger_path, "all-fail", ALL_ROLES, SPEC_DIGEST, ParallelRoleConfig(), R.always_fail)
    assert [r.status for r in info.value.results] == [RunStatus.FAILED] * len(ALL_ROLES)
    assert all(r.output is None and r.error.type == "RuntimeError" for r in info.value.results)
    assert "broke" in info.value.results[0].error.message
    assert "Traceback" in info.value.results[0].error.traceback
    with Ledger(ledger_path) as ledger:
        assert {r.status for r in ledger.list_runs("all-fail")} == {RunStatus.FAILED}


def test_one_failure_among_successes_does_not_raise(run_batch):
    results, _ = run_batch(["ok-1", "fail-1", "ok-2"], R.fail_if_named_fail)
    assert [r.status for r in results] == [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.COMPLETED]
    failed = results[1]
    assert failed.output is None  # not dressed up as a fixer output, as the seed did
    assert failed.error.message == "fail-1 refused"
    assert failed.reason is Reason.ERROR


def test_successful_results_give_tokens_that_verify(run_batch):
    results, _ = run_batch(ALL_ROLES, R.typed_output)
    for result in results:
        token = token_from_result(result)
        token.verify()
        assert token.from_role == result.role
        assert token.output_digest == content_digest(canonical_json(token.output.to_dict()).encode())


def test_token_from_a_failed_result_is_refused(run_batch):
    results, _ = run_batch(["fail-x", "ok"], R.fail_if_named_fail)
    with pytest.raises(ParrolesError):
        token_from_result(results[0])


def test_fail_fast_cancels_the_roles_it_skips(run_batch, ledger_path):
    # One worker: the failing role runs first; the rest are queued or in loky's lookahead.
    results, batch_id = run_batch(["fail", "a", "b", "c"], R.crash_table, max_concurrent=1, fail_fast=True)
    failed, *skipped = results
    assert failed.status is RunStatus.FAILED
    with Ledger(ledger_path) as ledger:
        for result in skipped:
            assert result.status is RunStatus.CANCELLED
            assert result.reason is Reason.FAIL_FAST
            assert result.cancelled_by == failed.run_id
            record = ledger.get_run(result.run_id)
            assert record.status is RunStatus.CANCELLED
            assert record.cancelled_by == failed.run_id
            assert record.started_at is None  # it never started
        assert not [r for r in ledger.list_runs(batch_id) if r.status in (RunStatus.QUEUED, RunStatus.RUNNING)]


# -- the seed's weaknesses, fixed ---------------------------------------------------------


def test_results_come_back_in_input_order(run_batch):
    roles = ["sleep-0.6", "sleep-0.3", "sleep-0.0", "sleep-0.1"]
    results, _ = run_batch(roles, R.sleep_by_name, max_concurrent=4)
    assert [r.role for r in results] == roles
    assert [r.output for r in results] == roles


def test_duplicate_roles_each_get_their_own_run(run_batch):
    results, _ = run_batch(["coder", "coder", AgentRole.CODER], R.echo)
    assert len({r.run_id for r in results}) == 3
    assert all(r.role is AgentRole.CODER for r in results)


def test_durations_are_measured(run_batch, ledger_path):
    results, _ = run_batch(["sleep-0.25"], R.sleep_by_name)
    assert results[0].duration_ms >= 250
    with Ledger(ledger_path) as ledger:
        record = ledger.get_run(results[0].run_id)
    assert record.summary.duration_ms >= 250
    assert record.queued_at <= record.started_at < record.finished_at
    assert (record.finished_at - record.started_at).total_seconds() >= 0.25


def test_events_are_stored_in_order_with_their_count(run_batch, ledger_path):
    results, _ = run_batch(["emitter"], R.emit_many)
    with Ledger(ledger_path) as ledger:
        events = ledger.get_events(results[0].run_id)
        record = ledger.get_run(results[0].run_id)
    assert [e.seq for e in events] == list(range(1, 51))
    assert [e.payload["i"] for e in events] == list(range(50))
    assert {e.kind for e in events} == {"step"}
    assert record.summary.total_events == 50


def test_events_emitted_before_a_crash_are_kept(run_batch, ledger_path):
    results, _ = run_batch(["child-then-exit"], R.crash_table)
    assert results[0].status is RunStatus.FAILED
    with Ledger(ledger_path) as ledger:
        assert [e.kind for e in ledger.get_events(results[0].run_id)] == ["child"]
        assert ledger.get_run(results[0].run_id).summary.total_events == 1


def test_terminal_runs_are_immutable(run_batch, ledger_path):
    results, _ = run_batch(["done"], R.echo)
    run_id = results[0].run_id
    with Ledger(ledger_path) as ledger:
        with pytest.raises(ImmutableRunError):
            ledger.finish_run(run_id, RunStatus.FAILED)
        with pytest.raises(LedgerError):
            ledger.append_event(run_id, "late", {"x": 1})
        record = ledger.get_run(run_id)
    assert record.status is RunStatus.COMPLETED
    assert record.summary.total_events == 0


@pytest.mark.parametrize("role", ALL_ROLES)
def test_typed_outputs_round_trip(run_batch, ledger_path, role):
    results, _ = run_batch([role], R.typed_output)
    expected = R.TYPED_OUTPUTS[role.value]
    assert results[0].output == expected
    assert results[0].output.producing_role() is role
    with Ledger(ledger_path) as ledger:
        record = ledger.get_run(results[0].run_id)
    assert record.output == expected
    assert record.output_digest == content_digest(expected.to_json().encode())


def test_custom_role_outputs_round_trip(run_batch):
    outputs = {"lister": [1, "two", None], "texter": "plain", "numberer": 4.5, "mapper": {"kind": "mine", "n": 1}}
    results, _ = run_batch(list(outputs), lambda role, run_id: outputs[role])
    assert [r.output for r in results] == list(outputs.values())


def test_lambdas_and_closures_run_in_workers(run_batch):
    prefix = "closed-over"
    results, _ = run_batch(["x", "y"], lambda role, run_id: f"{prefix}:{role}")
    assert [r.output for r in results] == ["closed-over:x", "closed-over:y"]

    def make_runner(factor: int):
        def runner(role, run_id):
            return len(str(role)) * factor
        return runner

    results, _ = run_batch(["abc"], make_runner(7))
    assert results[0].output == 21


def test_at_most_max_concurrent_roles_overlap(run_batch, ledger_path):
    results, batch_id = run_batch(["sleep-0.2" for _ in range(6)], R.sleep_by_name, max_concurrent=2)
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs(batch_id)
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs])
    running, peak = 0, 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2  # both workers used, never more
    assert len({r.worker_pid for r in runs}) >= 2


def test_empty_roles_give_an_empty_batch(ledger_path):
    assert execute_roles_parallel(ledger_path, "empty", [], SPEC_DIGEST, ParallelRoleConfig(), R.echo) == []
    with Ledger(ledger_path) as ledger:
        batch = ledger.get_batch("empty")
    assert batch.counts == {s.value: 0 for s in RunStatus}
    assert batch.finished_at is not None


@pytest.mark.parametrize("bad", [0, -1, "a", 1.5, True, None])
def test_bad_max_concurrent_is_rejected(bad):
    with pytest.raises(ValueError, match="max_concurrent"):
        ParallelRoleConfig(max_concurrent=bad)


@pytest.mark.parametrize("field,value", [("cancel_grace", -1), ("role_timeout", 0), ("role_timeout", "soon"),
                                         ("role_timeouts", {"coder": -2}), ("max_output_bytes", 0),
                                         ("fail_fast", "yes")])
def test_bad_config_values_are_rejected(field, value):
    with pytest.raises(ConfigError, match=field.split("s")[0]):
        ParallelRoleConfig(**{field: value})


@pytest.mark.parametrize("args", [
    {"parent_run_id": ""},
    {"spec_digest": "not-a-digest"},
    {"spec_digest": "A" * 64},
    {"role_executor": "not callable"},
    {"roles": ["ok", ""]},
    {"role_executor": (lambda lock: (lambda role, run_id: lock))(threading.Lock())},  # a lock cannot be pickled
])
def test_bad_calls_write_nothing(ledger_path, args):
    call = {"parent_run_id": "bad", "roles": ["a"], "spec_digest": SPEC_DIGEST, "role_executor": R.echo} | args
    with pytest.raises(ValueError):
        execute_roles_parallel(ledger_path, call["parent_run_id"], call["roles"], call["spec_digest"],
                               ParallelRoleConfig(), call["role_executor"])
    with Ledger(ledger_path) as ledger:
        assert ledger.list_batches() == []
        assert ledger.list_runs() == []


def test_a_batch_id_cannot_be_reused(ledger_path):
    execute_roles_parallel(ledger_path, "once", ["a"], SPEC_DIGEST, ParallelRoleConfig(), R.echo)
    with pytest.raises(ConfigError, match="already in the ledger"):
        execute_roles_parallel(ledger_path, "once", ["a"], SPEC_DIGEST, ParallelRoleConfig(), R.echo)


def test_output_that_is_not_json_fails_the_role(run_batch):
    results, _ = run_batch(["unpicklable-return", "fine"], R.crash_table)
    assert results[0].status is RunStatus.FAILED
    assert "not JSON-serialisable" in results[0].error.message
    assert results[1].status is RunStatus.COMPLETED


def test_output_or_an_event_with_a_lone_surrogate_fails_the_role_as_output(run_batch):
    """Issue 20 item 12: text that is not valid Unicode is the role's output's fault (reason output), not a crash."""
    def role(name, run_id):
        if name == "event":
            context().emit("bad", {"text": "\ud800"})
        return {"text": "\udcff"} if name == "output" else "fine"

    results, _ = run_batch(["output", "event", "fine"], role)
    assert [r.status for r in results] == [RunStatus.FAILED, RunStatus.FAILED, RunStatus.COMPLETED]
    assert results[0].reason is Reason.OUTPUT and "not valid Unicode" in results[0].error.message
    assert "not valid Unicode" in results[1].error.message and "event 1 ('bad')" in results[1].error.message


def test_a_lone_surrogate_in_an_event_kind_or_an_error_never_blocks_the_ledger(run_batch, ledger_path, recwarn):
    """Found by breaking issue 20: such text made every commit (and every later open) fail."""
    def role(name, run_id):
        if name == "kind":
            context().emit("bad\ud800", {"x": 1})
        if name == "message":
            raise ValueError("a file name read with surrogateescape: \udc80")
        return name

    results, batch_id = run_batch(["kind", "message", "fine"], role)
    assert [r.status for r in results] == [RunStatus.FAILED, RunStatus.FAILED, RunStatus.COMPLETED]
    assert results[0].error.type == "parroles.EventPayloadError" and "not valid Unicode" in results[0].error.message
    assert results[1].error.message == "a file name read with surrogateescape: \\udc80"
    assert not [w for w in recwarn if issubclass(w.category, parroles.LedgerPendingWarning)]
    with Ledger(ledger_path) as ledger:
        assert [r.status for r in ledger.list_runs(batch_id)] == [r.status for r in results]
    with pytest.raises(ConfigError, match="not valid Unicode"):
        run_batch(["bad\ud800"], role)


def test_output_over_the_size_limit_fails_the_role(run_batch):
    results, _ = run_batch(["big", "small"], lambda role, run_id: "x" * (2000 if role == "big" else 10),
                           max_output_bytes=1000)
    assert results[0].status is RunStatus.FAILED
    assert results[0].reason is Reason.OUTPUT
    assert "over the limit of 1000 bytes" in results[0].error.message
    assert results[1].status is RunStatus.COMPLETED


def test_context_outside_a_role_is_a_clear_error():
    with pytest.raises(NoActiveRole, match="inside a running role"):
        context()


def test_context_inside_a_role(run_batch, ledger_path):
    def report(role, run_id):
        ctx = context()
        return {"role": str(ctx.role), "run_id": ctx.run_id, "parent": ctx.parent_run_id,
                "cancelled": ctx.cancelled()}

    results, batch_id = run_batch([AgentRole.TESTER], report)
    assert results[0].output == {"role": "tester", "run_id": results[0].run_id, "parent": batch_id,
                                 "cancelled": False}


def test_cancellation_is_cooperative(run_batch, tmp_path):
    # "fail" fails under fail-fast; the others see cancelled(): one stops, one finishes its work anyway.
    results, _ = run_batch(["fail", "stopper", "finisher"], R.CancelledThenReturn(tmp_path, ("stopper", "finisher")),
                           max_concurrent=3, fail_fast=True, cancel_grace=30)
    fail, stopper, finisher = results
    assert fail.status is RunStatus.FAILED
    assert stopper.status is RunStatus.CANCELLED and stopper.reason is Reason.FAIL_FAST
    assert stopper.error.type == "parroles.RoleCancelled"
    assert finisher.status is RunStatus.COMPLETED and finisher.output == "finished anyway"


def test_workers_never_import_duckdb(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import roles_for_tests as R
        from parroles import execute_roles_parallel, ParallelRoleConfig
        results = execute_roles_parallel({str(tmp_path / 'l.duckdb')!r}, "probe", ["a", "b"], {SPEC_DIGEST!r},
                                         ParallelRoleConfig(max_concurrent=2), R.role_modules)
        print(json.dumps([r.output for r in results]))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[], []]


def test_git_sha_is_recorded(run_batch, ledger_path, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True, timeout=30)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.chdir(repo)
    results, _ = run_batch(["a"], R.echo)
    with Ledger(ledger_path) as ledger:
        assert ledger.get_run(results[0].run_id).metadata["git_sha"] == sha


def test_handoff_token_detects_tampering():
    token = HandoffToken.new(R.TYPED_OUTPUTS["reviewer"])
    token.verify()
    forged = HandoffToken(token.token_id, token.from_role, R.TYPED_OUTPUTS["fixer"], token.output_digest)
    with pytest.raises(InvalidHandoffToken):
        forged.verify()


def test_the_ledger_is_readable_while_a_batch_runs(tmp_path, ledger_path):
    """Another process sees a RUNNING row while the role still runs: the writer does not hold the lock."""
    script = tmp_path / "reader.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from parroles import Ledger
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with Ledger({str(ledger_path)!r}, read_only=True, busy_timeout=5) as ledger:
                    if [r for r in ledger.list_runs("watched") if r.status.value == "RUNNING"]:
                        print("seen RUNNING")
                        sys.exit(0)
            except Exception as exc:
                pass
            time.sleep(0.05)
        sys.exit(1)
    """))
    reader = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)

    def wait_for_reader(role, run_id):
        # The role runs until the reader has seen it RUNNING (or 60 s pass).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and reader_done.exists() is False:
            time.sleep(0.05)
        return "seen"

    reader_done = tmp_path / "reader-done"

    def mark_done():
        reader.wait(timeout=90)
        reader_done.touch()

    threading.Thread(target=mark_done, daemon=True).start()
    results = execute_roles_parallel(ledger_path, "watched", ["slow"], SPEC_DIGEST, ParallelRoleConfig(),
                                     wait_for_reader)
    assert reader.wait(timeout=90) == 0
    assert results[0].status is RunStatus.COMPLETED


def test_a_newer_schema_is_refused(ledger_path):
    with Ledger(ledger_path):
        pass
    import duckdb

    con = duckdb.connect(str(ledger_path))
    con.execute("INSERT INTO schema_version VALUES (999, now())")
    con.close()
    with pytest.raises(LedgerError, match="newer parroles"):
        Ledger(ledger_path)


def test_the_writer_waits_out_a_reader_and_loses_nothing(tmp_path, ledger_path):
    """A reader in another process holds the file; the batch's records wait for it, then all land."""
    with Ledger(ledger_path):
        pass  # the file exists, so the reader can open it
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, duckdb
        con = duckdb.connect({str(ledger_path)!r}, read_only=True)
        print("holding", flush=True)
        time.sleep(1.5)
        con.close()
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        results = execute_roles_parallel(ledger_path, "waited", ["a", "b", "c"], SPEC_DIGEST,
                                         ParallelRoleConfig(max_concurrent=3), R.emit_many)
    finally:
        holder.wait(timeout=60)
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 3
    with Ledger(ledger_path) as ledger:
        assert [r.status for r in ledger.list_runs("waited")] == [RunStatus.COMPLETED] * 3
        assert [len(ledger.get_events(r.run_id)) for r in results] == [50, 50, 50]


def test_an_internal_error_leaves_no_run_active(ledger_path, monkeypatch):
    """If the parent's own loop fails, its runs are ended in the ledger before the error propagates."""
    import parroles.runner.batch

    def broken(self, message, now):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(parroles.runner.batch.Batch, "finished", broken)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        execute_roles_parallel(ledger_path, "broken", ["a", "b"], SPEC_DIGEST, ParallelRoleConfig(), R.echo)
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs("broken")
    assert all(r.status.terminal for r in runs)
    assert {r.reason for r in runs} == {Reason.CRASH}


def test_a_failed_commit_is_kept_and_lands_once_the_file_is_free(ledger_path):
    """Records of a commit that failed (another process held the file too long) are neither lost nor doubled."""
    from parroles.ledger.journal import pending_records
    from parroles.ledger.pending import NewRuns
    from parroles.ledger.writer import LedgerWriter

    writer = LedgerWriter(str(ledger_path), busy_timeout=0.3)
    writer.open()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, duckdb
        deadline = time.monotonic() + 30
        while True:  # the writer may still hold the file for a moment after opening it
            try:
                con = duckdb.connect({str(ledger_path)!r}, read_only=True)
                break
            except duckdb.Error:
                if time.monotonic() > deadline:
                    sys.exit(1)
                time.sleep(0.02)
        print("holding", flush=True)
        sys.stdin.readline()  # until the test says so
        con.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        now = time.time()
        ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(3)]
        batch = {"batch_id": "held", "name": None, "spec_digest": SPEC_DIGEST, "config": "{}", "state": "RUNNING",
                 "started_at": now, "n_roles": 3, "owner_host": "h", "owner_pid": 1, "owner_started": 0.0}
        writer.start_batch(batch, NewRuns(ids, [0, 1, 2], ["a", "b", "c"], "held", SPEC_DIGEST, None, now))
        for run_id in ids:
            writer.transition(run_id, RunStatus.RUNNING, started_at=now, worker_pid=1, attempt=1)
        writer.add_event(ids[0], "step", '{"n": 1}', now)
        left = writer.flush(wait=0.3)  # the file is held: the records wait in the journal
        assert left > 0 and pending_records(str(ledger_path)) == left
        writer.transition(ids[1], RunStatus.COMPLETED, finished_at=now, duration_ms=1.0, output='"done"')
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        assert writer.flush(wait=30) == 0
        assert pending_records(str(ledger_path)) == 0  # committed: the journal is empty again
    finally:
        if holder.poll() is None:
            holder.kill()
        writer.close()
    with Ledger(ledger_path, read_only=True) as ledger:
        runs = ledger.list_runs("held")
        assert [r.status for r in runs] == [RunStatus.RUNNING, RunStatus.COMPLETED, RunStatus.RUNNING]
        assert runs[1].output == "done"
        assert [e.payload for e in ledger.get_events(ids[0])] == [{"n": 1}]
        assert len(ledger.list_batches(batch_id="held")) == 1


def test_git_sha_is_none_outside_a_work_tree(tmp_path, monkeypatch):
    from parroles.runner import provenance

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert provenance.git_sha() is None
    assert provenance.git_sha_soon().result(timeout=30) is None


def test_git_starts_only_between_other_process_starts(tmp_path, monkeypatch):
    # A plain fork (the loky backend's Manager) taken while git was halfway started would hold git's pipe.
    import concurrent.futures

    from parroles.backends import START_LOCK
    from parroles.runner import provenance

    monkeypatch.chdir(tmp_path)
    with START_LOCK:
        pending = provenance.git_sha_soon()
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(timeout=0.5)
    assert pending.result(timeout=30) is None or len(pending.result()) == 40


def test_a_git_lookup_that_never_ends_records_no_sha(monkeypatch):
    import concurrent.futures

    from parroles.runner import provenance

    monkeypatch.setattr(provenance, "GIT_TIMEOUT", 0.1)
    assert provenance.answer(concurrent.futures.Future()) is None  # a batch does not wait on it


def test_every_recorded_error_type_is_a_name_parroles_exports(run_batch, tmp_path):
    """Issue 21 item 6: one importable name per cause, whichever way a run was stopped."""
    def role(name, run_id):
        if name == "fail":  # once the other two run, so that fail-fast stops them both
            deadline = time.monotonic() + 60
            while not all((tmp_path / other).exists() for other in ("deaf", "coop")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            raise ValueError("planned")
        (tmp_path / name).touch()
        if name == "deaf":
            time.sleep(60)
        while name == "coop":
            context().check_cancelled()
            time.sleep(0.01)

    results, _ = run_batch(["fail", "deaf", "coop"], role, max_concurrent=3, fail_fast=True, cancel_grace=0.5)
    assert [r.error.type for r in results] == ["ValueError", "parroles.RoleCancelled", "parroles.RoleCancelled"]

    def other(name, run_id):
        if name == "slow":
            time.sleep(60)
        if name == "crash":
            os._exit(3)
        raise ValueError("planned")

    results, _ = run_batch(["slow", "crash", "fails"], other, max_concurrent=3, role_timeout=0.5, cancel_grace=0.2)
    types = [r.error.type for r in results]
    assert types == ["parroles.RoleTimeout", "parroles.WorkerCrashed", "ValueError"]
    for recorded in types:
        if recorded.startswith("parroles."):
            assert issubclass(getattr(parroles, recorded.removeprefix("parroles.")), parroles.ParrolesError)


def test_a_run_cancelled_before_it_started_says_why_whatever_the_cause(run_batch):
    """Found by breaking issue 21: under fail-fast its error was NULL, under a signal it named the signal."""
    results, _ = run_batch(["fail", "queued"], R.crash_table, max_concurrent=1, fail_fast=True)
    assert results[1].status is RunStatus.CANCELLED and results[1].reason is Reason.FAIL_FAST
    assert results[1].error.type == "parroles.RoleCancelled" and results[1].error.message == "fail-fast: fail failed"


@pytest.mark.parametrize("as_values", [True, False], ids=["values", "arrow"])
def test_runs_that_move_before_their_insert_is_committed_are_written_as_with_an_update(tmp_path, monkeypatch,
                                                                                        as_values):
    """Issue 26: a run's transitions that share its insert's commit are written by the insert (no UPDATE);
    the rows are those an insert followed by updates makes, column for column."""
    from parroles.ledger import commit
    from parroles.ledger.pending import NewRuns
    from parroles.ledger.schema import RUN_COLUMNS
    from parroles.ledger.writer import LedgerWriter

    monkeypatch.setattr(commit, "_as_values", lambda count: as_values)
    inserted_as_moved: list[set[str]] = []
    real_insert = commit._insert_runs
    monkeypatch.setattr(commit, "_insert_runs", lambda *args: inserted_as_moved.append(real_insert(*args)) or
                        inserted_as_moved[-1])
    now = time.time()
    tables = []
    for folded in (True, False):
        path = str(tmp_path / f"{folded}.duckdb")
        writer = LedgerWriter(path)
        writer.open()
        ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(5)]
        batch = {"batch_id": "b", "name": None, "spec_digest": SPEC_DIGEST, "config": "{}", "state": "RUNNING",
                 "started_at": now, "n_roles": 5, "owner_host": "h", "owner_pid": 1, "owner_started": 0.0}
        writer.start_batch(batch, NewRuns(ids, list(range(5)), ["a", "b", "c", "d", "e"], "b", SPEC_DIGEST, "sha",
                                          now, params=[None, '{"x":1}', None, None, None],
                                          waiting=[False, False, True, True, False]))
        if not folded:
            assert writer.flush(wait=30) == 0  # the insert alone: what follows is written as updates
        for run_id in ids[:4]:  # the fifth stays QUEUED
            writer.transition(run_id, RunStatus.RUNNING, started_at=now + 1, worker_pid=7, worker_host="w",
                              attempt=1, threads=None)
        writer.transition(ids[0], RunStatus.COMPLETED, finished_at=now + 2, duration_ms=1000.0, output='{"y": 2}',
                          output_digest="d" * 64, cpu_user_ms=5.0, cache_parts='{"role":"a"}', cache_key="k" * 64)
        writer.transition(ids[1], RunStatus.FAILED, finished_at=now + 2, error='{"type": "E", "message": "m"}',
                          reason="error")
        writer.transition(ids[2], RunStatus.CANCELLED, finished_at=now + 3, reason="upstream", ready_at=now + 0.5,
                          cancelled_by=ids[1])
        assert writer.close(wait=30) == 0
        with Ledger(path) as ledger:
            names = [name for name, _ in RUN_COLUMNS]
            tables.append(ledger.query(f"SELECT {', '.join(names)} FROM runs ORDER BY position"))
    assert [len(ids) for ids in inserted_as_moved] == [4, 0]  # folded: 4 runs written by their insert
    assert tables[0] == tables[1]
    statuses = [row[[name for name, _ in RUN_COLUMNS].index("status")] for row in tables[0]]
    assert statuses == ["COMPLETED", "FAILED", "CANCELLED", "RUNNING", "QUEUED"]


@pytest.mark.parametrize("as_values", [True, False], ids=["values", "arrow"])
def test_a_group_is_written_the_same_bound_as_values_or_through_arrow(ledger_path, monkeypatch, as_values):
    """Issue 26: a group of 100 runs is bound as VALUES (pyarrow not loaded) or as an Arrow table (loaded)."""
    from parroles.ledger import commit

    monkeypatch.setattr(commit, "_as_values", lambda count: as_values)
    batch = parroles.run([f"r{i}" for i in range(100)], R.echo, ledger=ledger_path, max_concurrent=2)
    assert batch.ok
    with Ledger(ledger_path) as ledger:
        rows = ledger.query("SELECT role, status, output, position FROM runs WHERE parent_run_id = ? ORDER BY position",
                            [batch.batch_id])
    assert [(role, status, position) for role, status, _, position in rows] == [
        (f"r{i}", "COMPLETED", i) for i in range(100)]
    assert [json.loads(output) for *_, output, _ in rows] == [r.output for r in batch]
