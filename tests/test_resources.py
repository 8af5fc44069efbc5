"""What each run cost (CPU time, peak memory), and an order that learns from the ledger's history."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import parroles
from parroles import ConfigError, Ledger, Role
from parroles.runner.ready import ReadyRuns
from parroles.runner.tracked import TrackedRun
from parroles.spec.load import load_spec

MB = 1024 * 1024


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds`` of process time (not wall: a loaded machine only makes it slower)."""
    end, loops = time.process_time() + seconds, 0
    while time.process_time() < end:
        loops += 1
    return loops


def hog(megabytes: int) -> int:
    block = bytearray(megabytes * MB)
    for i in range(0, len(block), 4096):  # touched, so it is resident
        block[i] = 1
    return len(block)


def child_spin(seconds: float) -> None:
    code = f"import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_each_run_records_its_cpu_time_and_peak_memory(ledger_path):
    # Workers started from a parent that once held 400 MB: a worker's ru_maxrss keeps that peak across its
    # exec, so the peak must be read where the reset shows (VmHWM), or every role would report the parent's.
    parroles.shutdown_workers()
    hog(400)
    roles = [Role("hog", hog, params={"megabytes": 200}), Role("small", lambda: 1),
             Role("spin", spin, params={"seconds": 0.3}), Role("child", child_spin, params={"seconds": 0.3})]
    result = parroles.run(roles, ledger=ledger_path, max_concurrent=1, order="given")  # one worker, in turn
    assert result.ok
    by_role = result.by_role
    assert by_role["hog"].cost.max_rss_bytes >= 200 * MB
    # The peak is the role's own: reset as each role starts, so the role after the hog does not inherit it.
    assert by_role["small"].cost.max_rss_bytes < by_role["hog"].cost.max_rss_bytes - 100 * MB
    assert by_role["spin"].cost.cpu_ms >= 250  # user and system: reading the process clock is a system call
    assert by_role["child"].cost.cpu_ms >= 250  # a child process it waited for counts too
    with Ledger(ledger_path, read_only=True) as ledger:
        recorded = ledger.get_run(by_role["spin"].run_id)
    assert recorded.cost == by_role["spin"].cost


def test_ready_runs_start_longest_first_with_unknown_ones_first_in_the_order_given():
    runs = [TrackedRun(i, f"r{i}", f"r{i}", str(i), None) for i in range(5)]
    ready = ReadyRuns({1: 10.0, 2: 500.0, 4: 50.0})  # 0 and 3 have no history
    for run in runs:
        ready.push(run)
    assert [ready.pop().position for _ in range(5)] == [0, 3, 2, 4, 1]
    given = ReadyRuns(None)
    for run in reversed(runs):
        given.push(run)
    assert [given.pop().position for _ in range(5)] == [0, 1, 2, 3, 4]


def started_order(ledger_path, batch_id: str) -> list[str]:
    with Ledger(ledger_path, read_only=True) as ledger:
        return [str(run.role) for run in sorted(ledger.list_runs(batch_id), key=lambda run: run.started_at)]


def test_the_order_learns_from_the_ledger(ledger_path):
    roles = [Role("short", spin, params={"seconds": 0.0}), Role("mid", spin, params={"seconds": 0.1}),
             Role("long", spin, params={"seconds": 0.4})]
    first = parroles.run(roles, ledger=ledger_path, max_concurrent=1)
    assert started_order(ledger_path, first.batch_id) == ["short", "mid", "long"]  # no history: as given
    second = parroles.run(roles, ledger=ledger_path, max_concurrent=1)
    assert started_order(ledger_path, second.batch_id) == ["long", "mid", "short"]
    given = parroles.run(roles, ledger=ledger_path, max_concurrent=1, order="given")
    assert started_order(ledger_path, given.batch_id) == ["short", "mid", "long"]
    with Ledger(ledger_path, read_only=True) as ledger:
        assert ledger.get_batch(second.batch_id).run_order == "longest_first"
        assert ledger.get_batch(given.batch_id).run_order == "given"


def test_a_bad_order_is_a_config_error():
    with pytest.raises(ConfigError, match="order must be one of longest_first, given"):
        parroles.ParallelRoleConfig(order="fastest")


def thread_variables() -> dict[str, str | None]:
    import os

    from parroles.backends.threads import THREAD_VARIABLES

    return {name: os.environ.get(name) for name in THREAD_VARIABLES}


def test_workers_share_the_cpus_and_a_role_may_ask_for_its_own_cap(ledger_path, monkeypatch):
    from parroles.backends.threads import THREAD_VARIABLES, cap_for

    parroles.shutdown_workers()  # workers that start now, with the environment below
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NUMEXPR_NUM_THREADS", "7")  # set by the user: left alone
    roles = [Role("default", thread_variables), Role("own", thread_variables, threads=3),
             Role("after", thread_variables)]
    result = parroles.run(roles, ledger=ledger_path, max_concurrent=1, order="given")
    assert result.ok
    share = str(cap_for(1))
    default, own, after = (result.by_role[name].output for name in ("default", "own", "after"))
    assert default == {name: "7" if name == "NUMEXPR_NUM_THREADS" else share for name in THREAD_VARIABLES}
    assert set(own.values()) == {"3"}
    assert after == default  # the role's own cap was for it alone
    with Ledger(ledger_path, read_only=True) as ledger:
        recorded = {str(run.role): run.threads for run in ledger.list_runs(result.batch_id)}
    assert recorded == {"default": int(share), "own": 3, "after": int(share)}
    parroles.shutdown_workers()  # the next test's workers start without this test's environment


def grow(megabytes: int) -> int:
    """Take memory 10 MB at a time, touching it, so a watch sees it grow."""
    blocks = []
    for _ in range(megabytes // 10):
        block = bytearray(10 * MB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(0.01)
    return len(blocks)


def test_a_role_past_its_memory_limit_is_killed_alone(ledger_path, tmp_path):
    done = tmp_path / "hog-ended"
    roles = [Role("hog", grow, params={"megabytes": 600}, memory_limit="150MiB"),
             Role("calm", wait_for_file, params={"path": str(done)})]
    result = parroles.run(roles, ledger=ledger_path, max_concurrent=2, on_update=touch_when_ended("hog", done))
    hog, calm = result.by_role["hog"], result.by_role["calm"]
    assert hog.status.value == "FAILED" and hog.reason is parroles.Reason.MEMORY
    assert hog.error.type == "parroles.MemoryLimitExceeded" and "over its memory_limit of 150 MiB" in hog.error.message
    assert calm.status.value == "COMPLETED"  # its sibling on the other worker went on
    with Ledger(ledger_path, read_only=True) as ledger:
        recorded = ledger.get_run(hog.run_id)
    # Its worker died: no CPU figures, but the peak the watch saw, in the record and in the result.
    assert recorded.cost.cpu_ms is None and recorded.cost.max_rss_bytes > 150 * MB
    assert hog.cost == recorded.cost
    assert recorded.reason is parroles.Reason.MEMORY


def test_memory_is_a_retry_reason_and_the_limit_grows_per_attempt(ledger_path):
    role = Role("hog", grow, params={"megabytes": 250}, memory_limit="150MiB", retries=1)
    result = parroles.run([role], ledger=ledger_path, max_concurrent=1, memory_limit_growth=2.0, retry_delay=0)
    assert result.ok and result[0].attempt == 2


def test_memory_limits_are_checked():
    with pytest.raises(ConfigError, match="memory_limit must be a size in bytes"):
        parroles.ParallelRoleConfig(memory_limit="lots")
    with pytest.raises(ConfigError, match="memory_limit needs the loky backend"):
        parroles.ParallelRoleConfig(memory_limit="1GiB", backend="dask")
    assert parroles.ParallelRoleConfig(memory_limit="2GiB").memory_limit == 2 * 1024 ** 3
    assert Role("a", lambda: 1, memory_limit="512MB").memory_limit == 512 * 1000 ** 2


def wait_for_file(path: str) -> str:
    deadline = time.monotonic() + 60
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "calm"


def touch_when_ended(role: str, path: Path):
    def on_update(update: parroles.RunUpdate) -> None:
        if str(update.role) == role and update.result is not None:
            path.touch()
    return on_update


def test_the_eta_comes_from_the_history():
    from parroles.runner.history import eta_seconds

    expected = {0: 4000.0, 1: 2000.0}  # role 2 has no history: the mean, 3 s
    elapsed = {0: 1.0, 1: None, 2: None, 3: 9.0}  # 3 has run past what it was expected to take
    assert eta_seconds(expected, 2, elapsed, ended=[]) == pytest.approx((3 + 2 + 3 + 0) / 2)
    assert eta_seconds(expected, 2, elapsed, ended=[0, 1]) == pytest.approx(3 / 2)
    assert eta_seconds({}, 2, elapsed, ended=[]) is None


def hog_and_hold(megabytes: int) -> int:
    block = bytearray(megabytes * MB)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(5)  # held until the watch sees it
    return len(block)


def test_roles_queued_behind_a_role_killed_for_memory_are_not_failed_as_crashes(ledger_path):
    # Short roles travel in chunks: hogs killed one after another for their memory_limit hand the roles queued
    # behind them on their worker back each time. Those roles did nothing wrong: they run, whatever the count.
    quick = [Role(f"quick{i}", lambda: 1) for i in range(30)]
    hogs = [Role(f"hog{i}", hog_and_hold, params={"megabytes": 120}, memory_limit="80MB") for i in range(5)]
    late = [Role(f"late{i}", lambda: 2) for i in range(10)]
    result = parroles.run([*quick, *hogs, *late], ledger=ledger_path, max_concurrent=1, order="given")
    statuses = {r.role: (r.status.value, r.reason.value if r.reason else None) for r in result}
    assert {statuses[f"hog{i}"] for i in range(5)} == {("FAILED", "memory")}
    assert {statuses[name] for name in statuses if not name.startswith("hog")} == {("COMPLETED", None)}


def test_thread_caps_and_sizes_out_of_range_are_config_errors(tmp_path):
    # runs.threads is an INTEGER: a cap past it would be taken, then fail every later write of the ledger.
    with pytest.raises(ConfigError, match="threads must be an integer from 1 to 4096, got 2147483648"):
        Role("a", lambda: 1, threads=2**31)
    with pytest.raises(ConfigError, match="threads must be an integer from 1 to 4096"):
        parroles.ParallelRoleConfig(threads=10**6)
    spec = tmp_path / "spec.toml"
    spec.write_text('[batch]\nname = "t"\n[[roles]]\nname = "a"\ncall = "os:getpid"\nthreads = 2147483648\n')
    with pytest.raises(parroles.SpecError, match="threads must be an integer from 1 to 4096"):
        load_spec(spec)
    assert Role("a", lambda: 1, threads=4096).threads == 4096
    with pytest.raises(ConfigError, match="memory_limit must be a size in bytes"):
        parroles.ParallelRoleConfig(memory_limit="0.5")  # no byte at all
