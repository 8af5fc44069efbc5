"""Idle workers kept between batches: warm starts without leaking one batch into the next."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import roles_for_tests as R
from conftest import SPEC_DIGEST
from waiting import runs_with_status, still_running, wait_until

import parroles
from parroles import Ledger, ParallelRoleConfig, RunStatus, execute_roles_parallel, shutdown_workers
from parroles.backends.loky import pool as loky_pool

WAIT = 10.0  # upper bound of a wait for processes to end


def _pids(ledger_path, batch_id: str) -> set[int]:
    with Ledger(ledger_path, read_only=True) as ledger:
        return {r.worker_pid for r in ledger.list_runs(batch_id) if r.worker_pid is not None}


def _run_script(tmp_path: Path, text: str, *args: str, timeout: float = 120,
                **options: Any) -> subprocess.CompletedProcess[str]:
    """Write ``text`` as a script in ``tmp_path`` and run it in a fresh interpreter with ``args``."""
    script = tmp_path / "script.py"
    script.write_text(text)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          **options)


def _running(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.Error:
            pass
    return alive


def _wait_gone(pids: set[int], timeout: float = WAIT) -> set[int]:
    return set(still_running(pids, within=timeout))


def _idle_pool():
    return loky_pool.idle_pool()


def test_the_next_batch_runs_on_the_same_warm_workers(run_batch, ledger_path):
    first, first_id = run_batch(["a", "b", "c", "d"], R.echo, max_concurrent=2)
    pool = _idle_pool()
    assert pool is not None and _running(_pids(ledger_path, first_id))  # kept idle between the batches
    second, second_id = run_batch(["e", "f", "g", "h"], R.echo, max_concurrent=2)
    assert all(r.status is RunStatus.COMPLETED for r in first + second)
    assert _idle_pool() is pool
    assert _pids(ledger_path, second_id) & _pids(ledger_path, first_id)


def test_idle_worker_timeout_zero_stops_the_workers_with_the_batch(run_batch, ledger_path):
    results, results_id = run_batch(["a", "b"], R.echo, max_concurrent=2, idle_worker_timeout=0)
    assert loky_pool.idle_pool() is None
    assert _wait_gone(_pids(ledger_path, results_id)) == set()


def test_idle_workers_stop_after_their_timeout(run_batch, ledger_path):
    results, results_id = run_batch(["a", "b"], R.echo, max_concurrent=2, idle_worker_timeout=0.3)
    assert _wait_gone(_pids(ledger_path, results_id)) == set()
    assert loky_pool.idle_pool() is None


def test_shutdown_workers_stops_the_idle_pool(run_batch, ledger_path):
    results, results_id = run_batch(["a", "b"], R.echo, max_concurrent=2)
    assert loky_pool.idle_pool() is not None
    shutdown_workers()
    assert loky_pool.idle_pool() is None
    assert _wait_gone(_pids(ledger_path, results_id)) == set()


def test_each_batch_runs_its_own_role_executor(run_batch):
    first, first_id = run_batch(["x", "y"], lambda role, run_id: f"first {role}", max_concurrent=2)
    second, second_id = run_batch(["x", "y"], lambda role, run_id: f"second {role}", max_concurrent=2)
    assert [r.output for r in first] == ["first x", "first y"]
    assert [r.output for r in second] == ["second x", "second y"]


def test_a_fail_fast_batch_does_not_cancel_the_next_one(run_batch, ledger_path, tmp_path):
    first, first_id = run_batch(["fail", "waiter", "queued"], R.CancelledThenReturn(tmp_path, ("waiter",)),
                                max_concurrent=2, fail_fast=True, cancel_grace=30)
    assert [r.status for r in first] == [RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CANCELLED]
    second, second_id = run_batch(["a", "b", "c"], lambda role, run_id: __import__("parroles").context().cancelled(),
                          max_concurrent=2)
    # workers that saw the first batch's cancel event ran roles of the second
    assert _pids(ledger_path, second_id) & _pids(ledger_path, first_id)
    assert [(r.status, r.output) for r in second] == [(RunStatus.COMPLETED, False)] * 3


def test_a_timed_out_role_leaves_no_stop_request_for_the_next_batch(run_batch):
    first, first_id = run_batch(["polite", "a"], R.crash_table, max_concurrent=2, role_timeout=0.3, cancel_grace=30)
    assert first[0].status is RunStatus.FAILED
    second, _ = run_batch(["check"] * 4, lambda role, run_id: __import__("parroles").context().cancelled(),
                          max_concurrent=2)
    assert [(r.status, r.output) for r in second] == [(RunStatus.COMPLETED, False)] * 4


def test_processes_a_completed_role_started_die_with_its_batch(run_batch, ledger_path):
    results, results_id = run_batch(["child"], lambda role, run_id: R.start_child(), max_concurrent=1)
    assert results[0].status is RunStatus.COMPLETED
    assert _running(_pids(ledger_path, results_id))  # the worker is kept...
    assert _wait_gone({results[0].output}) == set()  # ...but not what its role left running


def test_a_batch_after_a_crash_runs_on_live_workers(run_batch, ledger_path):
    first, _ = run_batch(["exit", "a"], R.crash_table, max_concurrent=2)
    assert first[0].status is RunStatus.FAILED
    with Ledger(ledger_path, read_only=True) as ledger:
        crashed = ledger.get_run(first[0].run_id).worker_pid
    second, second_id = run_batch(["a", "b", "c", "d"], R.echo, max_concurrent=2)
    assert all(r.status is RunStatus.COMPLETED for r in second)
    assert crashed is not None and crashed not in _pids(ledger_path, second_id)


def test_a_pool_of_another_size_is_replaced(run_batch, ledger_path):
    first, first_id = run_batch(["a", "b"], R.echo, max_concurrent=2)
    second, second_id = run_batch(["a", "b", "c"], R.echo, max_concurrent=3)
    assert all(r.status is RunStatus.COMPLETED for r in second)
    assert not _pids(ledger_path, second_id) & _pids(ledger_path, first_id)
    assert _wait_gone(_pids(ledger_path, first_id)) == set()


def test_a_larger_idle_pool_serves_a_smaller_batch_within_max_concurrent(run_batch, ledger_path):
    run_batch(["a", "b", "c"], R.echo, max_concurrent=3)
    pool = _idle_pool()
    second, _ = run_batch(["solo"], R.echo, max_concurrent=3)
    assert second[0].status is RunStatus.COMPLETED
    assert _idle_pool() is pool and pool.max_workers == 3


def test_a_batch_that_ends_in_an_error_keeps_no_workers(ledger_path, tmp_path):
    def explode(update):
        raise RuntimeError("observer failed")

    with pytest.raises(RuntimeError, match="observer failed"):
        execute_roles_parallel(ledger_path, "batch-error", ["a", "b"], SPEC_DIGEST,
                               ParallelRoleConfig(max_concurrent=2), R.echo, on_update=explode)
    assert loky_pool.idle_pool() is None
    with Ledger(ledger_path, read_only=True) as ledger:
        assert all(r.status is not RunStatus.RUNNING for r in ledger.list_runs("batch-error"))


def test_sys_path_is_given_per_batch(run_batch, ledger_path, tmp_path):
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "only_here.py").write_text("VALUE = 'found'\n")
    run_batch(["warm"], R.echo, max_concurrent=1)

    def uses_module(role, run_id):
        import only_here

        return only_here.VALUE

    results = execute_roles_parallel(ledger_path, "batch-sys-path", ["a"], SPEC_DIGEST,
                                     ParallelRoleConfig(max_concurrent=1), uses_module, sys_path=[str(module_dir)])
    assert results[0].output == "found"
    assert str(module_dir) not in sys.path  # the parent's own path is untouched


def test_batches_in_two_threads_at_once_each_get_workers(ledger_path):
    import concurrent.futures

    def batch(tag: str) -> list:
        return execute_roles_parallel(ledger_path, f"batch-{tag}", ["sleep-0.2"] * 4, SPEC_DIGEST,
                                      ParallelRoleConfig(max_concurrent=2), R.sleep_by_name)

    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        futures = [threads.submit(batch, tag) for tag in ("left", "right")]
        results = [future.result(timeout=120) for future in futures]
    assert [r.status for both in results for r in both] == [RunStatus.COMPLETED] * 8
    with Ledger(ledger_path, read_only=True) as ledger:
        left, right = _pids(ledger_path, "batch-left"), _pids(ledger_path, "batch-right")
        assert len(ledger.list_runs("batch-left")) == len(ledger.list_runs("batch-right")) == 4
    assert not left & right  # each batch had a pool of its own while both ran
    assert _idle_pool() is not None  # one is kept; the other was stopped
    stopped = left if _running(right) else right
    assert _wait_gone(stopped) == set()


def _nothing() -> None:
    pass


def test_a_fork_while_a_pool_is_idle_leaves_the_pool_alone(run_batch):
    import multiprocessing

    run_batch(["a", "b"], R.echo, max_concurrent=2)
    pool = _idle_pool()
    child = multiprocessing.get_context("fork").Process(target=_nothing)
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert pool.healthy()  # the child did not stop its parent's Manager on the way
    second, _ = run_batch(["c", "d"], R.echo, max_concurrent=2)
    assert [r.status for r in second] == [RunStatus.COMPLETED] * 2
    assert _idle_pool() is pool


def test_an_idle_pool_whose_manager_died_is_replaced(run_batch, ledger_path):
    first, first_id = run_batch(["a", "b"], R.echo, max_concurrent=2)
    pool = _idle_pool()
    manager = psutil.Process(pool.manager_pid)
    manager.kill()
    manager.wait(timeout=WAIT)
    second, second_id = run_batch(["c", "d"], R.echo, max_concurrent=2)
    assert [r.status for r in second] == [RunStatus.COMPLETED] * 2
    assert _idle_pool() is not pool
    assert _wait_gone(_pids(ledger_path, first_id)) == set()


def test_a_large_role_executor_travels_once_per_worker_not_with_every_chunk(run_batch, monkeypatch):
    import cloudpickle

    import parroles.backends.loky.slot

    sent: list[int] = []
    submit = parroles.backends.loky.slot.ProcessPoolExecutor.submit

    def spy(self, fn, *args, **kwargs):
        sent.append(len(cloudpickle.dumps(args)))
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(parroles.backends.loky.slot.ProcessPoolExecutor, "submit", spy)
    ballast = b"x" * 5_000_000
    results, _ = run_batch(["r"] * 200, lambda role, run_id: len(ballast), max_concurrent=2)
    assert [r.output for r in results] == [5_000_000] * 200
    assert len(sent) > 2  # many chunks...
    assert max(sent) < 100_000  # ...none of which carries the 5 MB executor


def test_an_idle_worker_killed_between_batches_is_replaced_and_nothing_runs_twice(run_batch, ledger_path):
    import os
    import signal

    first, first_id = run_batch(["a", "b"], R.echo, max_concurrent=2)
    victim = first[0].output["pid"]
    os.kill(victim, signal.SIGKILL)  # as the OOM killer would, while the pool is idle
    assert _wait_gone({victim}) == set()
    second, second_id = run_batch(["c", "d", "e", "f"], R.echo, max_concurrent=2)
    assert [(r.status, r.attempt) for r in second] == [(RunStatus.COMPLETED, 1)] * 4
    assert victim not in _pids(ledger_path, second_id)
    assert _idle_pool() is not None


# -- workers started ahead of a batch (parroles.start_workers; `parroles run` does it) ---------------


def _workers_of(pool) -> set[int]:
    """The pool's worker processes, once each has joined the channel (they boot on threads of their own)."""
    wait_until(lambda: None not in pool.worker_pids(), what="every worker of the pool up")
    return set(pool.worker_pids())


def test_start_workers_boots_a_pool_that_the_next_batch_of_that_size_takes(run_batch, ledger_path):
    parroles.start_workers(2, ParallelRoleConfig(max_concurrent=4))
    pool = _idle_pool()
    assert pool is not None and pool.max_workers == 2
    started_ahead = _workers_of(pool)
    assert len(started_ahead) == 2  # spawned now, before any batch
    results, batch_id = run_batch(["a", "b", "c"], R.echo, max_concurrent=2)
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 3
    assert _idle_pool() is pool  # taken, then kept idle again
    assert _pids(ledger_path, batch_id) <= started_ahead


def test_start_workers_twice_keeps_the_pool_already_started(run_batch):
    parroles.start_workers(2)
    pool = _idle_pool()
    parroles.start_workers(2)
    assert _idle_pool() is pool


def test_a_batch_of_another_size_does_not_use_workers_started_ahead(run_batch, ledger_path):
    parroles.start_workers(3)
    pool = _idle_pool()
    started_ahead = _workers_of(pool)
    results, batch_id = run_batch(["a", "b"], R.echo, max_concurrent=2)
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 2
    assert _idle_pool() is not pool and _idle_pool().max_workers == 2
    assert not started_ahead & _pids(ledger_path, batch_id)
    assert _wait_gone(started_ahead) == set()  # the pool that did not fit was shut down


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_start_workers_refuses_what_is_not_a_count_of_workers(workers):
    with pytest.raises(parroles.ConfigError, match="workers must be a positive int"):
        parroles.start_workers(workers)
    assert _idle_pool() is None


def test_start_workers_does_nothing_for_the_dask_backend():
    parroles.start_workers(2, ParallelRoleConfig(backend="dask"))
    assert _idle_pool() is None


# -- the fork server start method -------------------------------------------------------------------


def _parent_of_worker(role, run_id):
    import os

    return os.getppid()


def test_forkserver_workers_are_forked_from_the_fork_server_and_run_the_batch(run_batch, ledger_path):
    results, batch_id = run_batch(["a", "b", "c"], _parent_of_worker, max_concurrent=2, start_method="forkserver")
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 3
    servers = {r.output for r in results}
    assert len(servers) == 1 and servers != {os.getpid()}  # not children of this process: of the server
    assert "multiprocessing.forkserver" in " ".join(psutil.Process(servers.pop()).cmdline())
    assert _idle_pool().start_method == "forkserver"


def _frozen_objects(role, run_id):
    import gc

    return gc.get_freeze_count()


def test_a_forked_worker_starts_with_the_fork_servers_heap_frozen(run_batch):
    """Issue 26: the preloaded modules are frozen before any fork (shared pages; collections and exits skip them)."""
    results, _ = run_batch(["a"], _frozen_objects, max_concurrent=1, start_method="forkserver")
    assert results[0].status is RunStatus.COMPLETED
    assert results[0].output > 1000  # every object of parroles' worker modules, loky and cloudpickle


def _spawn_a_process(role, run_id):
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=os.getpid)
    process.start()
    process.join(60)
    return process.exitcode


@pytest.mark.parametrize("start_method", ["loky", "forkserver"])
def test_a_role_can_use_multiprocessing_spawn_whatever_started_its_worker(run_batch, ledger_path, start_method):
    # loky had made itself multiprocessing's default in its workers: a spawn child was told to use it, and died.
    results, _ = run_batch(["a"], _spawn_a_process, start_method=start_method)
    assert [(r.status, r.output) for r in results] == [(RunStatus.COMPLETED, 0)]


def test_an_idle_pool_started_another_way_is_not_taken(run_batch, ledger_path):
    run_batch(["a", "b"], R.echo, max_concurrent=2)
    loky_started = _idle_pool()
    results, _ = run_batch(["a", "b"], R.echo, max_concurrent=2, start_method="forkserver")
    assert [r.status for r in results] == [RunStatus.COMPLETED] * 2
    assert _idle_pool() is not loky_started and _idle_pool().start_method == "forkserver"
    assert loky_started._closing  # shut down, not leaked


def test_an_unknown_start_method_is_a_config_error():
    with pytest.raises(parroles.ConfigError, match="start_method must be one of loky, forkserver"):
        ParallelRoleConfig(start_method="spawn")


REPLACED_WHILE_BOOTING = """
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
import parroles
from parroles import ParallelRoleConfig


def work(role, run_id):
    return 1


if __name__ == "__main__":
    parroles.start_workers(2, ParallelRoleConfig(start_method=sys.argv[2]))
    batch = parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method=sys.argv[3])
    print("ok" if batch.ok else "not ok")
"""


@pytest.mark.parametrize("started,batch", [("forkserver", "loky"), ("loky", "forkserver")])
def test_a_pool_replaced_while_its_workers_boot_says_nothing(tmp_path, started, batch):
    # Its workers find the pool's channel gone: they exit quietly, with no initializer traceback on stderr.
    done = _run_script(tmp_path, REPLACED_WHILE_BOOTING, str(tmp_path / "l.duckdb"), started, batch)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "Traceback" not in done.stderr and "initializer" not in done.stderr, done.stderr


UNGUARDED = """
import sys
import threading
from pathlib import Path
from typing import Any
import parroles


def work(role, run_id):
    return 1


batch = parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method="forkserver")  # no __main__ guard
print("ok" if batch.ok else "not ok")
"""


def test_a_script_without_the_main_guard_runs_no_batch_from_its_workers(tmp_path):
    # A forked worker imports the main module again: its call must neither run nor record a batch of its own.
    done = _run_script(tmp_path, UNGUARDED, str(tmp_path / "l.duckdb"))
    assert done.stdout.strip() == "not ok", done.stderr
    assert 'put the call under `if __name__ == "__main__":`' in done.stderr
    with Ledger(tmp_path / "l.duckdb", read_only=True) as ledger:
        assert len(ledger.list_batches()) == 1
        runs = ledger.list_runs()
    assert [r.status for r in runs] == [RunStatus.FAILED] * 2
    assert all("worker process (still starting) died before the role started" in r.error.message for r in runs)


IN_A_DAEMON = """
import multiprocessing
import sys
import threading
from pathlib import Path
from typing import Any
import parroles


def call(path):
    try:
        parroles.run(["a"], lambda role, run_id: 1, ledger=path)
    except parroles.ConfigError as exc:
        return str(exc)
    return "ran"


if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print(pool.apply(call, (sys.argv[1],)))
"""


def test_a_daemonic_process_is_told_it_cannot_start_workers_and_nothing_is_written(tmp_path):
    done = _run_script(tmp_path, IN_A_DAEMON, str(tmp_path / "l.duckdb"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("a daemonic process"), done.stdout
    assert not (tmp_path / "l.duckdb").exists()


STUCK_WHILE_STARTING = """
import fcntl
import sys
import threading
from pathlib import Path
from typing import Any
import parroles

_lock = open(sys.argv[2], "w")
fcntl.flock(_lock, fcntl.LOCK_EX)  # one copy at a time: a worker importing this module again waits forever


def work(role, run_id):
    return 1


if __name__ == "__main__":
    try:
        parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method="forkserver", cancel_grace=0.5)
    except KeyboardInterrupt:
        print("interrupted")
"""


def test_roles_handed_to_workers_stuck_while_starting_are_cancelled_by_ctrl_c(tmp_path):
    # Their workers never say hello: they cannot read the cancel event, so they are stopped after the grace.
    script, ledger_path = tmp_path / "stuck.py", tmp_path / "l.duckdb"
    script.write_text(STUCK_WHILE_STARTING)
    proc = subprocess.Popen([sys.executable, str(script), str(ledger_path), str(tmp_path / "app.lock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def forked_workers() -> list[psutil.Process]:
            for child in psutil.Process(proc.pid).children():
                try:
                    if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                        return child.children()
                except psutil.Error:  # one that ended meanwhile (a zombie has no command line)
                    pass
            return []

        wait_until(lambda: len(forked_workers()) == 2 and runs_with_status(ledger_path, "QUEUED") == 2,
                   what="two workers forked and stuck, two runs queued")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.strip() == "interrupted", err
    with Ledger(ledger_path, read_only=True) as ledger:
        runs = ledger.list_runs()
    assert [(r.status, r.reason) for r in runs] == [(RunStatus.CANCELLED, parroles.Reason.INTERRUPTED)] * 2
    assert all(r.started_at is None for r in runs)


def test_a_worker_that_never_starts_is_replaced_and_its_roles_fail_as_crashes_in_bounded_time(tmp_path):
    # No signal this time: without a start timeout the batch would wait for the stuck workers forever.
    ledger_path = tmp_path / "l.duckdb"
    stuck = STUCK_WHILE_STARTING.replace("if __name__", "import parroles.backends.loky.slot as slot\n"
                                         "slot.START_TIMEOUT = 0.5\n\nif __name__")
    done = _run_script(tmp_path, stuck, str(ledger_path), str(tmp_path / "app.lock"))
    assert done.returncode == 0, done.stderr
    with Ledger(ledger_path, read_only=True) as ledger:
        runs = ledger.list_runs()
    assert [(r.status, r.reason) for r in runs] == [(RunStatus.FAILED, parroles.Reason.CRASH)] * 2
    for run in runs:
        assert run.started_at is None
        assert run.error.message == ("worker process (still starting) died before the role started: "
                                     "killed, as it had not started within 0.5 s")


SIGNAL_MASKS = """
import multiprocessing
import sys
import threading
from pathlib import Path
from typing import Any
import time
import parroles


def work(role, run_id):
    return 1


def blocked(pid):
    with open(f"/proc/{pid}/status") as status:
        mask = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
    return sorted(signum for signum in (2, 15) if mask >> (signum - 1) & 1)


if __name__ == "__main__":
    parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method="forkserver")
    child = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(60,))
    child.start()
    time.sleep(0.5)  # let it reach its target
    print(blocked(child.pid))
    child.terminate()
    child.join(30)
    print(child.exitcode)
"""


def test_the_callers_own_forkserver_processes_start_with_signals_unblocked(tmp_path):
    # The fork server is shared; parroles starts it with SIGINT/SIGTERM blocked, which its children must not keep.
    done = _run_script(tmp_path, SIGNAL_MASKS, str(tmp_path / "l.duckdb"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", str(-signal.SIGTERM)], done.stdout


STARTING_MASK = """
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any

if "loky.backend.popen_loky_posix" in sys.argv or "-m" in sys.orig_argv and "loky.backend.popen_loky_posix" in sys.orig_argv:
    with open(f"/proc/{os.getpid()}/status") as status:
        mask = next(line for line in status if line.startswith("SigBlk:")).split()[1]
    with open(os.path.join(os.environ["PARROLES_TEST_PROBES"], str(os.getpid())), "w") as probe:
        probe.write(mask)
"""


def test_loky_started_workers_start_with_group_signals_blocked(tmp_path):
    # Each worker interpreter records its signal mask as it starts (a sitecustomize): a Ctrl-C to the group
    # while it boots is the parent's. multiprocessing's resource tracker, started by the first boot, had
    # unblocked them on that thread, so the first worker started unblocked.
    probes, site = tmp_path / "probes", tmp_path / "site"
    probes.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(STARTING_MASK)
    two_roles = ("import sys, parroles\n\ndef work(role, run_id):\n    return 1\n\n"
                 "if __name__ == '__main__':\n"
                 "    parroles.run(['a', 'b'], work, ledger=sys.argv[1], start_method='loky')\n")
    env = dict(os.environ, PYTHONPATH=str(site), PARROLES_TEST_PROBES=str(probes))
    done = _run_script(tmp_path, two_roles, str(tmp_path / "l.duckdb"), env=env)
    assert done.returncode == 0, done.stderr
    masks = [int(probe.read_text(), 16) for probe in probes.iterdir()]
    assert len(masks) == 2
    assert all(mask >> (signal.SIGINT - 1) & 1 and mask >> (signal.SIGTERM - 1) & 1 for mask in masks), masks


def test_exit_waits_for_workers_stuck_while_starting_no_longer_than_their_start_timeout(tmp_path):
    # loky's exit hook joins its threads, which wait for their workers (it runs before parroles' own exit hook):
    # a worker that never starts is ended by its start timeout, not never.
    start_workers_and_exit = STUCK_WHILE_STARTING.replace(
        '    try:\n        parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method="forkserver", cancel_grace=0.5)\n'
        '    except KeyboardInterrupt:\n        print("interrupted")\n',
        '    import parroles.backends.loky.slot as slot\n'
        '    slot.START_TIMEOUT = 1.0\n'
        '    parroles.start_workers(2, parroles.ParallelRoleConfig(start_method="forkserver"))\n'
        '    print("exiting")\n')
    done = _run_script(tmp_path, start_workers_and_exit, str(tmp_path / "l.duckdb"), str(tmp_path / "app.lock"),
                       timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr


STOPPED_SERVER = """
import multiprocessing
import os
import queue
import signal
import sys
import threading
from pathlib import Path
from typing import Any
import threading
from pathlib import Path
from typing import Any
from multiprocessing import forkserver

import psutil

import parroles
import parroles.backends.loky.slot as slot


def work(role, run_id):
    return 1


if __name__ == "__main__":
    slot.LAUNCH_WAIT = 0.2
    multiprocessing.get_context("forkserver").set_forkserver_preload([slot.SERVER_PRELOAD])
    forkserver.ensure_running()
    server = next(p.pid for p in psutil.Process().children() if "multiprocessing.forkserver" in " ".join(p.cmdline()))
    os.kill(server, signal.SIGSTOP)  # a fork server that does not answer: no worker can be launched
    print(server, flush=True)
    threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        parroles.run(["a", "b"], work, ledger=sys.argv[1], start_method="forkserver")
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_a_fork_server_that_does_not_answer_does_not_keep_the_interrupted_caller(tmp_path):
    # A launch stuck on the server holds loky's executor lock: stopping that slot must not wait for it.
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "l.duckdb")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    server = int(proc.stdout.readline())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        assert lines.get(timeout=45).strip() == "interrupted"  # while the server is still stopped
    finally:
        os.kill(server, signal.SIGCONT)
        try:
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    with Ledger(tmp_path / "l.duckdb", read_only=True) as ledger:
        assert [(r.status, r.reason) for r in ledger.list_runs()] == [
            (RunStatus.CANCELLED, parroles.Reason.INTERRUPTED)] * 2
