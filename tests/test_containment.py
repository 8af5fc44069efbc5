"""Containment: whatever a role starts ends with it, in whatever session or process group it moved to.

Each role here starts three escapees: a child in a new session
(``start_new_session=True``), one in a new process group (``process_group=0``)
and a double-forked grandchild in a session of its own, orphaned at once,
that stays in Python and so holds every descriptor its worker had. A
zombie counts as gone. On Dask they end with the role (when no other role
runs in its worker), on parroles' own LocalCluster and on another cluster
(whose workers become subreapers at their first role).
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest
import roles_for_tests as R
from waiting import WAIT, child_pids, running, start_parent, still_running, wait_for_running

from parroles import Ledger, RunStatus
from parroles.backends import missing_requirement
from parroles.backends.loky import pool as loky_pool
from parroles.results import Reason

GONE_WITHIN = 2.0  # the promise: seconds after the role's, batch's or parent's end
needs_dask = pytest.mark.skipif(missing_requirement("dask") is not None, reason="distributed is not installed")


def _still_running(pids: list[int]) -> list[int]:
    return still_running(pids, within=GONE_WITHIN)


def _helper_pids(ledger_path: Path, batch_id: str) -> list[int]:
    with Ledger(ledger_path) as ledger:
        return [pid for run in ledger.list_runs(batch_id) for e in ledger.get_events(run.run_id)
                if e.kind == "helpers" for pid in e.payload["pids"]]


def test_what_a_completed_role_left_ends_with_its_batch_though_its_worker_is_kept(run_batch, ledger_path):
    results, batch_id = run_batch(["escape-then-quick"], R.escape_table, max_concurrent=1)
    assert results[0].status is RunStatus.COMPLETED
    children = child_pids(ledger_path, [results[0].run_id])
    assert len(children) == 3
    assert _still_running(children) == []
    with Ledger(ledger_path) as ledger:
        worker = ledger.get_run(results[0].run_id).worker_pid
    assert loky_pool.idle_pool() is not None and running(worker)  # kept for the next batch


@pytest.fixture
def other_cluster():
    """A cluster that is not parroles' own (no preload): a worker becomes a subreaper at its first role."""
    import distributed

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@needs_dask
@pytest.mark.parametrize("cluster", ["own", "other"])
def test_what_a_completed_role_left_ends_with_it_on_dask(run_batch, ledger_path, request, cluster):
    address = request.getfixturevalue("other_cluster") if cluster == "other" else None
    results, _ = run_batch(["escape-then-quick"], R.escape_table, max_concurrent=1, backend="dask",
                           dask_address=address)
    assert results[0].status is RunStatus.COMPLETED
    children = child_pids(ledger_path, [results[0].run_id])
    assert len(children) == 3
    assert _still_running(children) == []


BACKENDS = {"loky": {}, "dask": {"backend": "dask"}}  # dask: parroles' own LocalCluster, max_concurrent workers
STOPS = {
    # never polls: its worker is killed after the grace
    "timeout-killed": (["escape-then-forever", "watch"],
                       {"role_timeouts": {"escape-then-forever": 0.5}, "cancel_grace": 0.3}),
    # polls, and stops itself: its worker lives on
    "timeout-polite": (["escape-then-polite", "watch"],
                       {"role_timeouts": {"escape-then-polite": 0.5}, "cancel_grace": 30}),
    "fail-fast": (["escape-then-polite", "fail-after-escape", "watch"],
                  {"fail_fast": True, "cancel_grace": 30, "max_concurrent": 3}),
}


@pytest.mark.parametrize("backend", [pytest.param(name, marks=[needs_dask] if name == "dask" else [])
                                     for name in BACKENDS])
@pytest.mark.parametrize("stop", STOPS)
def test_what_a_stopped_role_started_ends_while_its_batch_still_runs(run_batch, tmp_path, stop, backend):
    roles, config = STOPS[stop]
    results, _ = run_batch(roles, R.Watcher(str(tmp_path)), **{"max_concurrent": 2, **config, **BACKENDS[backend]})
    escaper, watch = results[0], results[-1]
    if stop == "fail-fast":
        assert escaper.status is RunStatus.CANCELLED and escaper.reason is Reason.FAIL_FAST
    else:
        assert escaper.status is RunStatus.FAILED and escaper.reason is Reason.TIMEOUT
    # "watch" (never cancelled: it does not poll) returned only once all three
    # escapees were gone, while the batch was still running.
    assert watch.status is RunStatus.COMPLETED and len(watch.output) == 3


START_METHODS = ["loky", "forkserver"]  # fresh interpreters; forked from the fork server (whose child a worker is)


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_parent_leaves_no_escapee(ledger_path, signum, code, start_method):
    parent = start_parent(ledger_path, "signalled", ["escape-then-forever", "escape-then-polite"], "escape_table",
                           max_concurrent=2, cancel_grace=0.5, start_method=start_method)
    running = wait_for_running(ledger_path, "signalled", 2, events=6)
    helpers = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
    children = child_pids(ledger_path, running)
    assert len(children) == 6
    parent.send_signal(signum)
    assert parent.wait(timeout=WAIT) == code
    assert _still_running(helpers + children) == []


@pytest.mark.parametrize("start_method", START_METHODS)
def test_kill_9_of_the_parent_leaves_no_escapee_and_no_resource_tracker(ledger_path, start_method):
    parent = start_parent(ledger_path, "killed", ["escape-then-forever", "escape-then-forever"], "escape_table",
                           max_concurrent=2, start_method=start_method)
    running = wait_for_running(ledger_path, "killed", 2, events=6)
    helpers = psutil.Process(parent.pid).children(recursive=True)
    assert any("resource_tracker" in " ".join(p.cmdline()) for p in helpers)
    children = child_pids(ledger_path, running)
    assert len(children) == 6
    parent.kill()
    parent.wait(timeout=WAIT)
    assert _still_running([p.pid for p in helpers] + children) == []


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_parent_that_exits_normally_leaves_no_escapee_and_no_resource_tracker(ledger_path, start_method):
    # The double-forked escapee holds the resource tracker's pipe: while it lived, so did the tracker.
    parent = start_parent(ledger_path, "clean", ["escape-then-quick", "helpers"], "escape_table", max_concurrent=2,
                          start_method=start_method)
    assert parent.wait(timeout=WAIT) == 0
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs("clean")
    assert [r.status for r in runs] == [RunStatus.COMPLETED] * 2
    children = child_pids(ledger_path, [runs[0].run_id])
    helpers = _helper_pids(ledger_path, "clean")
    assert len(children) == 3 and len(helpers) >= 3  # two workers and the resource tracker at least
    assert _still_running(children + helpers) == []
