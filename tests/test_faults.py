"""Fault tolerance: crashed workers, timeouts, signals, parent death, orphaned runs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fork_roles
import psutil
import pytest
import roles_for_tests as R
from waiting import (
    child_pids,
    fork_server_pid,
    runs_with_status,
    start_parent,
    still_running,
    wait_for_running,
    wait_until,
)

import parroles
from parroles import Ledger, RunStatus
from parroles.results import BatchState, Reason

HERE = Path(__file__).parent
WAIT = 60.0  # upper bound of any wait for a subprocess state; a hang fails instead




# -- crashes ------------------------------------------------------------------------------

CRASHES = [
    ("exit", r"EXIT\(1\)"),
    ("sigkill", r"SIGKILL\(-9\)"),
    ("segfault", r"SIGSEGV\(-11\)"),
]


START_METHODS = ["loky", "forkserver"]  # a fresh interpreter per worker; a fork of the fork server


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("crash,pattern", CRASHES)
def test_a_dying_worker_fails_only_its_own_role(run_batch, ledger_path, crash, pattern, start_method):
    roles = ["a", "b", "slow", "c", crash, "d", "e", "slow", "f", "g"]
    results, batch_id = run_batch(roles, R.crash_table, max_concurrent=3, start_method=start_method)
    blamed = results[4]
    assert blamed.status is RunStatus.FAILED and blamed.reason is Reason.CRASH
    assert re.search(r"worker process \(pid \d+\) died: " + pattern, blamed.error.message)
    others = results[:4] + results[5:]
    assert [r.status for r in others] == [RunStatus.COMPLETED] * 9
    assert [r.output for r in others] == [f"{n} done" for n in roles if n != crash]
    with Ledger(ledger_path) as ledger:
        statuses = {r.status for r in ledger.list_runs(batch_id)}
        assert f"pid {ledger.get_run(blamed.run_id).worker_pid}" in blamed.error.message
    assert statuses == {RunStatus.COMPLETED, RunStatus.FAILED}


def _starts(directory: Path, role: str) -> int:
    return len(list(directory.glob(f"start-{role}-*")))


# Each kills (or gets killed) the worker it runs on while "sibling" runs on another worker.
DEATHS = {
    "exit": {},
    "sigkill": {},
    "segfault": {},
    "deaf": {"role_timeouts": {"deaf": 1.0}, "cancel_grace": 0.5},  # ignores SIGTERM, never polls
}


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("death", DEATHS)
def test_a_sibling_runs_once_through_another_workers_death(run_batch, ledger_path, tmp_path, death, start_method):
    marks = tmp_path / "marks"
    marks.mkdir()
    roles = ["sibling", death, "after-1", "after-2"]
    results, _ = run_batch(roles, R.Marked(str(marks)), max_concurrent=2, start_method=start_method, **DEATHS[death])
    sibling, dead, *after = results
    assert dead.status is RunStatus.FAILED
    assert dead.reason is (Reason.TIMEOUT if death == "deaf" else Reason.CRASH)
    # The sibling waited, inside its one run, until the other worker was dead; nothing restarted it.
    assert sibling.status is RunStatus.COMPLETED and sibling.output == "sibling done"
    assert sibling.attempt == 1
    assert _starts(marks, "sibling") == 1
    with Ledger(ledger_path) as ledger:
        record = ledger.get_run(sibling.run_id)
        events = ledger.get_events(sibling.run_id)
    assert record.attempt == 1 and record.summary.total_events == 6
    assert [(e.seq, e.kind, e.payload) for e in events] == [(i + 1, "tick", {"i": i}) for i in range(6)]
    for result in after:  # queued behind the death: each starts once
        assert result.status is RunStatus.COMPLETED and result.attempt == 1
        assert _starts(marks, str(result.role)) == 1
    assert _starts(marks, death) == 1


def test_roles_queued_behind_a_crash_start_once_each(run_batch, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    # Short roles travel in chunks, so "crash-now" takes down a worker with roles
    # queued behind it on that worker, not yet started: they start elsewhere, once.
    quick = [f"q{i}" for i in range(60)]
    roles = quick[:30] + ["crash-now"] + quick[30:]
    results, _ = run_batch(roles, R.Marked(str(marks)), max_concurrent=2)
    by_role = {str(r.role): r for r in results}
    assert by_role["crash-now"].status is RunStatus.FAILED and by_role["crash-now"].reason is Reason.CRASH
    assert [(by_role[q].status, by_role[q].attempt) for q in quick] == [(RunStatus.COMPLETED, 1)] * 60
    assert {q: _starts(marks, q) for q in quick} == {q: 1 for q in quick}


# A child forked by the role (os.fork / multiprocessing's fork context), then the worker's death.
FORKS = [("os", "exit", r"EXIT\(1\)"), ("mp", "sigkill", r"SIGKILL\(-9\)")]


@pytest.mark.timeout(90)  # far below the settle timer: a batch that needs it fails here
@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("fork,death,pattern", FORKS, ids=[f"{f}-fork-then-{d}" for f, d, _ in FORKS])
def test_a_child_forked_by_a_role_does_not_hold_its_dead_worker(run_batch, ledger_path, tmp_path, monkeypatch,
                                                                 fork, death, pattern, start_method):
    from parroles.backends.loky import backend

    # The forked child sleeps 300 s and the safety net would settle in an hour: the dead worker's slot
    # settles within the test's timeout only on the channel's EOF (the child dropped its copy at the fork).
    monkeypatch.setattr(backend, "SETTLE_TIMEOUT", 3600.0)
    marks = tmp_path / "marks"
    marks.mkdir()
    dying = f"fork-{fork}-{death}"
    try:
        results, _ = run_batch([dying, "q1", "q2", "q3"], fork_roles.ForkThenDie(str(marks)), max_concurrent=1,
                               start_method=start_method)
        dead, *queued = results
        with Ledger(ledger_path) as ledger:
            dead_pid = ledger.get_run(dead.run_id).worker_pid
        note = json.loads((marks / f"child-of-{dying}").read_text())
        assert dead.status is RunStatus.FAILED and dead.reason is Reason.CRASH
        assert re.search(rf"worker process \(pid {dead_pid}\) died: {pattern}", dead.error.message)
        # Its copy of the channel pointed at /dev/null from the fork on; it died with the worker's group.
        assert note["channel"] == "/dev/null"
        assert still_running([note["pid"]]) == []
        for result in queued:  # each started once, on another worker
            assert (result.status, result.attempt) == (RunStatus.COMPLETED, 1)
            assert result.output != dead_pid
            assert _starts(marks, str(result.role)) == 1
        assert _starts(marks, dying) == 1
    finally:
        for child in marks.glob("child-of-*"):
            with contextlib.suppress(psutil.Error, ValueError):
                psutil.Process(json.loads(child.read_text())["pid"]).kill()


@pytest.mark.parametrize("role", ["systemexit", "keyboardinterrupt"])
def test_systemexit_and_keyboardinterrupt_fail_the_role_only(run_batch, role):
    results, _ = run_batch(["a", role, "b"], R.crash_table, max_concurrent=2)
    assert results[1].status is RunStatus.FAILED
    assert results[1].error.type in {"SystemExit", "KeyboardInterrupt"}
    assert results[1].attempt == 1
    assert [results[0].status, results[2].status] == [RunStatus.COMPLETED] * 2


def test_unpicklable_exception_keeps_its_message(run_batch):
    results, _ = run_batch(["unpicklable-exception", "a"], R.crash_table)
    assert results[0].status is RunStatus.FAILED
    assert results[0].error.message == "cannot travel as a pickle"
    assert results[0].error.type.endswith("UnpicklableError")
    assert results[1].status is RunStatus.COMPLETED


# -- timeouts -----------------------------------------------------------------------------


def test_a_polite_role_that_times_out_fails_with_reason_timeout(run_batch):
    results, _ = run_batch(["polite", "a"], R.crash_table, role_timeout=0.5, cancel_grace=30)
    assert results[0].status is RunStatus.FAILED
    assert results[0].reason is Reason.TIMEOUT
    assert results[0].error.message == "timed out after 0.5 s"
    assert results[1].status is RunStatus.COMPLETED


def test_a_role_that_ignores_its_timeout_is_killed(run_batch):
    results, _ = run_batch(["forever", "slow", "b"], R.crash_table, max_concurrent=3,
                           role_timeouts={"forever": 0.5}, cancel_grace=0.5)
    forever, slow, b = results
    assert forever.status is RunStatus.FAILED and forever.reason is Reason.TIMEOUT
    assert "timed out after 0.5 s" in forever.error.message
    assert slow.status is RunStatus.COMPLETED and b.status is RunStatus.COMPLETED


@pytest.mark.parametrize("how", ["exit", "forever", "cancelled"])
def test_processes_a_role_started_die_with_it(run_batch, ledger_path, tmp_path, how):
    roles = {"exit": ["child-then-exit"], "forever": ["child-then-forever"],
             "cancelled": ["child-then-forever", "fail"]}[how]
    config = {"role_timeout": 0.5, "cancel_grace": 0.3} if how == "forever" else {"fail_fast": True, "cancel_grace": 0.3}
    executor = R.FailOnceChildStarted(str(tmp_path)) if how == "cancelled" else R.crash_table
    results, _ = run_batch(roles, executor, max_concurrent=2, **config)
    assert results[0].status in (RunStatus.FAILED, RunStatus.CANCELLED)
    children = child_pids(ledger_path, [results[0].run_id])
    assert len(children) == 1
    assert still_running(children) == []


# -- fail-fast with roles that never poll ---------------------------------------------------


def test_fail_fast_kills_roles_that_never_poll(run_batch, ledger_path):
    results, batch_id = run_batch(["forever", "forever", "fail", "queued-1", "queued-2"], R.crash_table,
                                  max_concurrent=3, fail_fast=True, cancel_grace=0.5)
    assert results[2].status is RunStatus.FAILED
    for result in results[:2]:
        assert result.status is RunStatus.CANCELLED and result.reason is Reason.FAIL_FAST
        assert re.search(r"was killed [0-9.]+ s after the role was told to stop \(its grace is 0.5 s\)", result.error.message)
    for result in results[3:]:
        assert result.status is RunStatus.CANCELLED and result.cancelled_by == results[2].run_id
    with Ledger(ledger_path) as ledger:
        assert {r.status for r in ledger.list_runs(batch_id)} == {RunStatus.CANCELLED, RunStatus.FAILED}


# -- the Manager dies -----------------------------------------------------------------------


def test_losing_the_manager_cancels_the_batch_without_hanging(ledger_path, tmp_path):
    from conftest import SPEC_DIGEST

    from parroles import ParallelRoleConfig, execute_roles_parallel

    roles = ["killer", "polite", "forever", "queued-1", "queued-2"]
    results = execute_roles_parallel(ledger_path, "no-manager", roles, SPEC_DIGEST,
                                     ParallelRoleConfig(max_concurrent=3, cancel_grace=0.5), R.ManagerKiller(tmp_path))
    killer, polite, forever, *queued = results
    assert killer.status is RunStatus.COMPLETED
    for result in (polite, forever, *queued):
        assert result.status is RunStatus.CANCELLED
        assert result.reason is Reason.CHANNEL_LOST
    # The Manager died under the two running roles: the killer waited for them to start.
    assert polite.duration_ms is not None and forever.duration_ms is not None
    assert "cancel channel was lost" in queued[0].error.message
    with Ledger(ledger_path) as ledger:
        assert not [r for r in ledger.list_runs("no-manager") if not r.status.terminal]


# -- the parent: signals and kill -9 --------------------------------------------------------


@pytest.mark.parametrize("signum,code,reason", [(signal.SIGINT, 130, Reason.INTERRUPTED),
                                                (signal.SIGTERM, 143, Reason.TERMINATED)])
def test_a_signal_cancels_running_and_queued_roles(ledger_path, signum, code, reason):
    roles = ["child-then-forever", "polite", "queued-1", "queued-2"]
    parent = start_parent(ledger_path, "signalled", roles, max_concurrent=2, cancel_grace=0.5)
    running = wait_for_running(ledger_path, "signalled", 2, events=1)
    helpers = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
    children = child_pids(ledger_path, running)
    parent.send_signal(signum)
    assert parent.wait(timeout=WAIT) == code
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs("signalled")
        batch = ledger.get_batch("signalled")
    assert [r.status for r in runs] == [RunStatus.CANCELLED] * 4
    assert {r.reason for r in runs} == {reason}
    assert batch.state is BatchState.INTERRUPTED
    assert still_running(helpers + children) == []


def test_a_signal_while_the_batch_is_recorded_starts_no_role(ledger_path, monkeypatch, run_batch):
    # Deferred until the batch loop listens, it must be acted on before the loop dispatches anything
    # (the git lookup can keep the batch's creation waiting for seconds, e.g. behind a slow worker start).
    from parroles.runner import provenance

    answer = provenance.answer

    def answer_and_get_interrupted(future):
        os.kill(os.getpid(), signal.SIGINT)  # deferred: recorded, not raised here
        return answer(future)

    run_batch(["warm"], R.echo, max_concurrent=2)  # warm workers: a role dispatched would start at once
    monkeypatch.setattr(provenance, "answer", answer_and_get_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(["a", "b", "c", "d"], R.echo, max_concurrent=2, idle_worker_timeout=60)
    with Ledger(ledger_path, read_only=True) as ledger:
        runs = [r for r in ledger.list_runs() if r.role != "warm"]
    assert [(r.status, r.reason, r.started_at) for r in runs] == [(RunStatus.CANCELLED, Reason.INTERRUPTED, None)] * 4


def test_kill_9_of_the_parent_leaves_nothing_running(ledger_path):
    roles = ["child-then-forever", "child-then-forever", "queued-1", "queued-2"]
    parent = start_parent(ledger_path, "killed", roles, max_concurrent=2)
    running = wait_for_running(ledger_path, "killed", 2, events=2)
    helpers = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
    children = child_pids(ledger_path, running)
    assert len(children) == 2
    parent.kill()
    parent.wait(timeout=WAIT)
    assert still_running(helpers + children, within=5) == []
    with Ledger(ledger_path) as ledger:  # opening for writing reconciles
        assert ledger.reconciled == ["killed"]
        runs = ledger.list_runs("killed")
        batch = ledger.get_batch("killed")
    assert [r.status for r in runs] == [RunStatus.FAILED] * 2 + [RunStatus.CANCELLED] * 2
    assert {r.reason for r in runs} == {Reason.ORPHANED}
    assert runs[0].error.message == "parent process died"
    assert batch.state is BatchState.CRASHED


def test_a_live_batch_is_never_reconciled_by_another_process(ledger_path):
    parent = start_parent(ledger_path, "alive", ["forever", "queued"], max_concurrent=1, cancel_grace=0.2)
    try:
        wait_for_running(ledger_path, "alive", 1)
        # Another process opening the ledger for writing must leave the live batch alone.
        probe = subprocess.run([sys.executable, "-c", f"from parroles import Ledger; "
                                f"l = Ledger({str(ledger_path)!r}); print(l.reconciled); l.close()"],
                               capture_output=True, text=True, timeout=WAIT)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == "[]"
    finally:
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=WAIT)


@pytest.mark.slow
def test_25_random_kills_never_corrupt_the_ledger(ledger_path):
    rng = random.Random(1234)
    completed: dict[str, object] = {}
    for i in range(25):
        batch_id = f"kill-{i}"
        parent = start_parent(ledger_path, batch_id, [f"r{n}" for n in range(400)], max_concurrent=2)
        time.sleep(rng.uniform(0.3, 2.0))
        parent.kill()
        parent.wait(timeout=WAIT)
        with Ledger(ledger_path) as ledger:
            runs = ledger.list_runs()
            (total, distinct), = ledger.query("SELECT count(*), count(DISTINCT run_id) FROM runs")
        assert total == distinct
        assert not [r for r in runs if not r.status.terminal]
        now_completed = {r.run_id: r.output for r in runs if r.status is RunStatus.COMPLETED}
        assert all(now_completed.get(run_id) == output for run_id, output in completed.items())
        completed = now_completed
    assert completed, "no run ever completed: the kills came too early to test anything"


def _until_told(role, run_id):
    ctx = parroles.context()
    while not ctx.cancelled():
        time.sleep(0.02)
    return "told"


def test_a_worker_on_its_way_out_is_not_taken_for_one_its_fork_server_left_running():
    # The channel can report a worker gone before it is a zombie; one look then blamed its (living) fork server.
    from parroles.backends.process_tree import outlives

    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dying = subprocess.Popen([sys.executable, "-c", "import os, time; time.sleep(0.3); os.kill(os.getpid(), 9)"])
    try:
        assert outlives(living.pid, 0.05)
        assert not outlives(dying.pid, WAIT)  # alive when asked, gone within the wait
    finally:
        for process in (living, dying):
            process.kill()
            process.wait(timeout=WAIT)


def test_the_fork_servers_death_fails_the_running_roles_and_says_so(run_batch, ledger_path):
    # loky hears of a forked worker's end from the fork server; when the server dies, the slots are lost.

    def kill_server_once_running() -> None:
        wait_until(lambda: runs_with_status(ledger_path, "RUNNING") == 2, what="both roles running")
        os.kill(fork_server_pid(), signal.SIGKILL)

    killer = threading.Thread(target=kill_server_once_running, daemon=True)
    killer.start()
    results, _ = run_batch(["a", "b"], _until_told, max_concurrent=2, start_method="forkserver", role_timeout=30)
    killer.join(timeout=WAIT)
    assert [(r.status, r.reason) for r in results] == [(RunStatus.FAILED, Reason.CRASH)] * 2
    assert all("lost with the fork server" in r.error.message for r in results)
    with Ledger(ledger_path) as ledger:
        workers = [ledger.get_run(r.run_id).worker_pid for r in results]
    assert len(set(workers)) == 2 and still_running(workers) == []  # stopped, not left running unrecorded
