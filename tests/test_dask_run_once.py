"""On Dask, a role's function runs once per dispatch, and every run is on record.

A worker that dies takes the results it holds with it, and Dask recomputes
every one that is still wanted; and it runs a task whose worker died again
elsewhere. parroles takes each outcome as soon as it exists, releases the
task at once, and marks a dispatch as begun on the scheduler before its
role runs, so neither makes a role run twice. One LocalCluster (2
single-threaded worker processes) serves the module.
"""

from __future__ import annotations

import os
import queue

import cloudpickle
import pytest
import roles_for_tests as R
from conftest import run_roles as run
from waiting import next_of

from parroles import Ledger, Reason, RunStatus
from parroles.backends import DaskOptions
from parroles.backends.protocol import Finished, Lost, OutcomeStatus, Task

distributed = pytest.importorskip("distributed")

SIBLINGS = [f"sibling-{i}" for i in range(6)]


def test_a_stop_set_before_the_role_began_is_no_begun_mark(dask_address):
    """The begun-mark and a stop request share the task's metadata: a stop that is there first (set before
    the task is even submitted, here) must not read as "begun elsewhere". The role runs, and hears why."""
    from parroles.backends.dask.backend import DaskBackend

    inbox: queue.Queue = queue.Queue()
    opened = DaskBackend.open(1, cloudpickle.dumps(R.crash_table), [], inbox.put, DaskOptions(dask_address, 10.0))
    try:
        opened.stop(1, "SIGINT received")
        opened.submit([Task(1, "polite", "run-polite", "batch-early-stop", 1, False, 1 << 20)])
        ended = next_of(inbox, (Finished, Lost))  # a Lost, had the stop read as a mark: no Started then
    finally:
        opened.close(ended_cleanly=True)
    assert isinstance(ended, Finished), ended
    assert ended.outcome.status is OutcomeStatus.CANCELLED and ended.outcome.stop_reason == "SIGINT received"



def test_a_segfaulting_role_makes_no_sibling_run_twice(ledger_path, tmp_path, dask_address):
    # Last, so that the worker it kills holds the results of the siblings it ran before.
    roles = [*SIBLINGS, "segfault-now"]
    results, batch_id = run(ledger_path, roles, R.Marked(str(tmp_path)), max_concurrent=2, backend="dask",
                            dask_address=dask_address)
    starts = {name: len([f for f in os.listdir(tmp_path) if f.startswith(f"start-{name}-")]) for name in roles}
    assert starts == {**{name: 1 for name in SIBLINGS}, "segfault-now": 1}
    *siblings, crashed = results
    assert all(r.attempt == 1 for r in results)
    # The sibling that ran just before it on the same worker may have its end still in that worker's send
    # buffer when it dies: recorded as a crash then (docs/dask.md), but never run again.
    lost = [r for r in siblings if r.status is not RunStatus.COMPLETED]
    assert len(lost) <= 1 and all(r.reason is Reason.CRASH for r in lost)
    assert crashed.status is RunStatus.FAILED and crashed.reason is Reason.CRASH
    assert "died while running it" in crashed.error.message
    with Ledger(ledger_path) as ledger:
        assert len(ledger.list_runs(batch_id)) == len(roles)
