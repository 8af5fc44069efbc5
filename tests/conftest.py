"""Shared fixtures: a fresh ledger per test, and a check that no process outlives its batch."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from parroles import (
    Ledger,
    ParallelExecutionFailed,
    ParallelRoleConfig,
    RoleRunResult,
    execute_roles_parallel,
    shutdown_workers,
)
from parroles.digests import content_digest

SPEC_DIGEST = content_digest(b"tests")
PROCESS_GONE_TIMEOUT = 10.0


# Sources of pids a test module keeps on purpose across tests (a Dask
# LocalCluster's worker processes), asked each time the check runs.
LONG_LIVED: list[Callable[[], set[int]]] = []


PROCESS_WIDE_HELPERS = ("resource_tracker", "multiprocessing.forkserver")


def _helpers(proc: psutil.Process) -> list[psutil.Process]:
    """Descendants that parroles started (workers, Manager, role children), not multiprocessing's and loky's
    process-wide helpers (resource trackers, the fork server), which live as long as this process."""
    kept = set().union(*(source() for source in LONG_LIVED))
    found = []
    for child in proc.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if child.pid not in kept and not any(helper in command for helper in PROCESS_WIDE_HELPERS):
                found.append(child)
        except psutil.Error:
            pass
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Every test ends with no worker, Manager or role-started process left once idle workers are stopped."""
    yield
    shutdown_workers()
    me = psutil.Process()
    _, alive = psutil.wait_procs(_helpers(me), timeout=PROCESS_GONE_TIMEOUT)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {[(p.pid, p.cmdline()) for p in alive]}"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "runs.duckdb"


def run_roles(ledger_path: Path, roles: Sequence[Any], role_executor: Callable[..., Any],
              **config: Any) -> tuple[list[RoleRunResult], str]:
    """Run a batch; returns (results, batch id). Never raises ParallelExecutionFailed."""
    batch_id = f"batch-{uuid.uuid4()}"
    try:
        results = execute_roles_parallel(ledger_path, batch_id, list(roles), SPEC_DIGEST,
                                         ParallelRoleConfig(**config), role_executor)
    except ParallelExecutionFailed as exc:
        results = exc.results
    return results, batch_id


@pytest.fixture
def run_batch(ledger_path: Path) -> Callable[..., tuple[list[RoleRunResult], str]]:
    """``run_roles`` on the test's ledger."""

    def run(roles: Sequence[Any], role_executor: Callable[..., Any], **config: Any) -> tuple[list[RoleRunResult], str]:
        return run_roles(ledger_path, roles, role_executor, **config)

    return run


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[Ledger]:
    """The test's ledger, opened after the batch (open it inside the test, after running)."""
    with Ledger(ledger_path) as opened:
        yield opened


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """A Dask LocalCluster of two single-threaded worker processes for the test module, its workers kept
    across its tests (``LONG_LIVED``). One retry after a worker dies, then KilledWorker: Dask does retry,
    and gives up soon."""
    distributed = pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    client = distributed.Client(cluster)

    def cluster_pids() -> set[int]:
        client.wait_for_workers(2, timeout=60)  # a killed worker is back before the check (a nanny restarts it)
        return set(client.run(os.getpid).values())

    LONG_LIVED.append(cluster_pids)
    try:
        yield cluster.scheduler_address
    finally:
        LONG_LIVED.remove(cluster_pids)
        client.close()
        cluster.close()
