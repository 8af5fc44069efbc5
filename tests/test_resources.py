"""What each run cost (CPU time, peak memory), and an order that learns from the ledger's history."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import parroles
from parroles import ConfigError, Ledger, Role
from parroles.runner.ready import ReadyRuns
from parroles.runner.tracked import TrackedRun

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
