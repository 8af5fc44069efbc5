"""The executor's contract holds on every backend: loky here, and a Dask cluster.

One Dask LocalCluster (2 single-threaded worker processes) serves the whole
module, so the Dask cases fit CI's time on 2 cores.
"""

from __future__ import annotations

import os
import queue
import signal
import time

import cloudpickle
import pytest
import roles_for_tests as R
from conftest import run_roles as run
from waiting import next_of

from parroles import BackendWarning, Ledger, ParallelRoleConfig, Reason, RunStatus
from parroles.backends import backend_class
from parroles.backends.protocol import Finished, OutcomeStatus, Started, Task

distributed = pytest.importorskip("distributed")



@pytest.fixture(params=["loky", "dask"])
def backend(request):
    if request.param == "dask":
        return {"backend": "dask", "dask_address": request.getfixturevalue("dask_address")}
    return {}




def test_statuses_order_and_isolation(ledger_path, backend):
    results, batch_id = run(ledger_path, ["sleep-0.3", "fail-x", "sleep-0.0", "sleep-0.1"],
                            lambda role, run_id: R.fail_if_named_fail(role, run_id) if role.startswith("fail")
                            else R.sleep_by_name(role, run_id), max_concurrent=2, **backend)
    assert [r.role for r in results] == ["sleep-0.3", "fail-x", "sleep-0.0", "sleep-0.1"]
    assert [r.status for r in results] == [RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.COMPLETED,
                                           RunStatus.COMPLETED]
    assert results[1].error.message == "fail-x refused"
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs(batch_id)
    assert len({r.run_id for r in runs}) == 4
    assert all(r.worker_pid and r.started_at and r.finished_at for r in runs)


def test_at_most_max_concurrent_overlap(ledger_path, backend):
    _, batch_id = run(ledger_path, ["sleep-0.2"] * 5, R.sleep_by_name, max_concurrent=2, **backend)
    with Ledger(ledger_path) as ledger:
        runs = ledger.list_runs(batch_id)
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_events_stream_in_order(ledger_path, backend):
    results, _ = run(ledger_path, ["emitter"], R.emit_many, **backend)
    with Ledger(ledger_path) as ledger:
        events = ledger.get_events(results[0].run_id)
        record = ledger.get_run(results[0].run_id)
    assert [e.payload["i"] for e in events] == list(range(50))
    assert [e.seq for e in events] == list(range(1, 51))
    assert record.summary.total_events == 50


def test_fail_fast_cancels_queued_roles(ledger_path, backend):
    results, _ = run(ledger_path, ["fail", "a", "b"], R.crash_table, max_concurrent=1, fail_fast=True, **backend)
    assert results[0].status is RunStatus.FAILED
    for result in results[1:]:
        assert result.status is RunStatus.CANCELLED and result.reason is Reason.FAIL_FAST
        assert result.cancelled_by == results[0].run_id


def test_cancelled_is_seen_by_running_roles(ledger_path, backend, tmp_path):
    results, _ = run(ledger_path, ["fail", "stopper"], R.CancelledThenReturn(tmp_path, ("stopper",)),
                     max_concurrent=2, fail_fast=True, cancel_grace=30, **backend)
    assert results[0].status is RunStatus.FAILED
    assert results[1].status is RunStatus.CANCELLED and results[1].reason is Reason.FAIL_FAST


def test_timeouts(ledger_path, backend, recwarn):
    results, _ = run(ledger_path, ["polite", "forever", "a"], R.crash_table, max_concurrent=3, role_timeout=0.5,
                     cancel_grace=0.5, **backend)
    polite, forever, a = results
    assert polite.status is RunStatus.FAILED and polite.reason is Reason.TIMEOUT
    assert forever.status is RunStatus.FAILED and forever.reason is Reason.TIMEOUT
    assert "timed out after 0.5 s" in forever.error.message
    assert a.status is RunStatus.COMPLETED
    # The killed role's worker was stopped for sure: on Dask, the batch's end waits for its restart
    # (its client closing under the restart once left the role running, with a BackendWarning).
    assert not [w for w in recwarn if issubclass(w.category, BackendWarning)]


def test_a_timed_out_role_is_told_its_timeout(ledger_path, backend):
    """What the role itself hears (its RoleCancelled, kept as the run's traceback) is the parent's why."""
    (polite,), _ = run(ledger_path, ["polite"], R.crash_table, role_timeout=0.5, cancel_grace=30, **backend)
    assert polite.status is RunStatus.FAILED and polite.reason is Reason.TIMEOUT
    assert polite.error.message == "timed out after 0.5 s"
    assert polite.error.traceback.rstrip().endswith("cancelled: timed out after 0.5 s")


def test_a_role_told_to_stop_hears_the_why_it_was_given(backend):
    """A single role's stop (``Backend.stop``) carries its why to the role, whatever it is: not a word of
    the backend's own (Dask once answered "the role's own timeout" to every stop)."""
    config = ParallelRoleConfig(**backend)
    inbox: queue.Queue = queue.Queue()
    opened = backend_class(config.backend).open(1, cloudpickle.dumps(R.crash_table), [], inbox.put,
                                                config.backend_options())
    why = "fail-fast: tester failed"
    try:
        opened.submit([Task(1, "polite", "run-polite", "batch-why", 1, False, 1 << 20)])
        next_of(inbox, Started)
        opened.stop(1, why)
        outcome = next_of(inbox, Finished).outcome
    finally:
        opened.close(ended_cleanly=True)
    assert outcome.status is OutcomeStatus.CANCELLED and outcome.stop_reason == why
    assert outcome.error.type == "parroles.RoleCancelled" and outcome.error.message.endswith(f"cancelled: {why}")


def test_a_dask_worker_killed_mid_role(ledger_path, dask_address):
    """Dask would run the role again on a worker that lives; parroles does not: FAILED, crash, attempt 1, once."""
    def slow_until_killed(role, run_id):
        import parroles

        parroles.context().emit("pid", {"pid": os.getpid()})
        time.sleep(1.5)
        return "done"

    killer_done = []

    def kill_soon():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with Ledger(ledger_path, read_only=True, busy_timeout=1) as ledger:
                    running = ledger.list_runs(status="RUNNING")
                    if running and running[0].worker_pid:
                        os.kill(running[0].worker_pid, signal.SIGKILL)
                        killer_done.append(running[0].worker_pid)
                        return
            except Exception:
                pass
            time.sleep(0.05)

    import threading

    threading.Thread(target=kill_soon, daemon=True).start()
    results, _ = run(ledger_path, ["victim"], slow_until_killed, max_concurrent=1, backend="dask",
                     dask_address=dask_address)
    assert killer_done, "the worker was never seen running the role"
    victim = results[0]
    assert victim.status is RunStatus.FAILED and victim.reason is Reason.CRASH and victim.attempt == 1
    assert "Dask worker tcp://" in victim.error.message and "died while running it" in victim.error.message
    with Ledger(ledger_path) as ledger:
        assert [e.kind for e in ledger.get_events(victim.run_id)] == ["pid"]  # it started once


def test_without_dask_installed_the_message_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    from click.testing import CliRunner

    from parroles.cli import cli
    from parroles.errors import BackendUnavailable

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"pip install 'parroles\[dask\]'"):
        ParallelRoleConfig(backend="dask")
    spec = tmp_path / "spec.toml"
    spec.write_text("[[roles]]\nname = 'a'\ncommand = ['true']\n")
    result = CliRunner().invoke(cli, ["run", str(spec), "--backend", "dask", "--ledger", str(tmp_path / "l.duckdb")])
    assert result.exit_code == 2
    assert "pip install 'parroles[dask]'" in result.output
    assert not (tmp_path / "l.duckdb").exists()


def _ledger_contents(ledger_path) -> list[tuple]:
    """What a batch recorded, without what differs by machine: pids, hosts, times, ids."""
    with Ledger(ledger_path) as ledger:
        (batch,) = ledger.list_batches()
        runs = ledger.list_runs(batch.batch_id)
        return [(str(r.role), r.status.value, r.output_digest, r.attempt, r.summary.total_events,
                 [(e.seq, e.kind, e.payload) for e in ledger.get_events(r.run_id)]) for r in runs]


def test_the_quickstart_gives_the_same_ledger_on_every_backend(tmp_path):
    """Run by parroles' own LocalCluster, by `dask scheduler`/`dask worker` (the loopback script), and by loky."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    spec = root / "examples" / "quickstart.toml"
    ledgers = {name: tmp_path / f"{name}.duckdb" for name in ("loky", "local-cluster", "loopback")}
    parroles_run = [sys.executable, "-m", "parroles", "run", str(spec), "--quiet"]
    for name, extra in (("loky", []), ("local-cluster", ["--backend", "dask"])):
        done = subprocess.run([*parroles_run, "--ledger", str(ledgers[name]), *extra], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(["bash", str(root / "scripts" / "dask_loopback.sh"), str(ledgers["loopback"])],
                          capture_output=True, text=True, timeout=300,
                          # The script's own `parroles`, `python` and `dask` are this interpreter's, not the PATH's.
                          env=os.environ | {"PARROLES_DASK_PORT": str(port),
                                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr
    expected = _ledger_contents(ledgers["loky"])
    assert [row[1] for row in expected] == ["COMPLETED"] * 5
    assert _ledger_contents(ledgers["local-cluster"]) == expected
    assert _ledger_contents(ledgers["loopback"]) == expected


def test_a_role_that_kills_every_dask_worker_it_runs_on_fails_as_a_crash(ledger_path, dask_address):
    """Once Dask gives up on it (KilledWorker), the role is FAILED, reason crash, naming the worker."""
    results, _ = run(ledger_path, ["exit", "a"], R.crash_table, max_concurrent=1, backend="dask",
                     dask_address=dask_address)
    crashed, after = results
    assert crashed.status is RunStatus.FAILED and crashed.reason is Reason.CRASH
    assert "Dask worker tcp://" in crashed.error.message and "died while running it" in crashed.error.message
    assert after.status is RunStatus.COMPLETED


def test_a_dask_worker_keeps_a_bounded_number_of_batch_states(ledger_path, dask_address):
    from parroles.backends.dask import worker as dask_worker

    for _ in range(dask_worker.KEPT_STATES + 3):
        results, _ = run(ledger_path, ["a", "b"], R.echo, backend="dask", dask_address=dask_address)
        assert [r.status for r in results] == [RunStatus.COMPLETED] * 2
    with distributed.Client(dask_address) as client:
        kept = client.run(lambda: __import__("importlib").import_module("parroles.backends.dask.worker").kept_batches())
    assert kept and all(0 < n <= dask_worker.KEPT_STATES for n in kept.values())


def test_a_held_role_end_crosses_with_the_next_message_in_one_frame_and_is_never_kept():
    """Issue 26: a chunk's role end goes with the next role's start (one write, one read); release sends it."""
    from multiprocessing import Pipe

    from parroles.backends.loky.channel import FRAME_SEPARATOR
    from parroles.backends.loky.messages import CHANNEL_WIRE
    from parroles.backends.loky.worker import ParentLink
    from parroles.backends.protocol import Outcome, from_wire

    parent, child = Pipe()
    link = ParentLink(child)
    ended = Finished(1, Outcome(OutcomeStatus.COMPLETED, output_json="1"))
    started = Started(2, os.getpid(), "here", time.time())
    link.hold(ended)
    assert not parent.poll(0)  # held, not sent
    link.send(started)
    frame = parent.recv_bytes()
    assert [from_wire(part, CHANNEL_WIRE) for part in frame.split(FRAME_SEPARATOR)] == [ended, started]
    link.hold(ended)
    link.hold(Finished(3, Outcome(OutcomeStatus.FAILED)))  # a second hold sends the first
    assert from_wire(parent.recv_bytes(), CHANNEL_WIRE) == ended
    link.release()
    assert from_wire(parent.recv_bytes(), CHANNEL_WIRE).dispatch_id == 3
    link.release()
    assert not parent.poll(0)  # nothing held twice


def test_every_wire_message_round_trips_as_tagged_json_and_garbage_is_a_value_error():
    """Issue 26: messages are msgspec Structs; the wire is a JSON object tagged with the class, defaults left out."""
    import json

    from parroles.backends.loky.messages import CHANNEL_WIRE, Cancel, Hello, Sweep
    from parroles.backends.protocol import Event, Logs, LossCause, Lost, Outcome, from_wire, to_wire
    from parroles.results import Cost, ErrorInfo, Reason

    messages = [
        Started(1, 2, "host", 3.5, threads=4), Event(1, "progress", '{"n": 1}', 4.0),
        Logs(1, [(0, "stdout", "a line é", 4.5)]),
        Finished(1, Outcome(OutcomeStatus.FAILED, error=ErrorInfo("ValueError", "bad", "tb"), reason=Reason.OUTPUT,
                            error_types=("ValueError", "builtins.ValueError"), exit_code=3, retry_after=-1.0,
                            cost=Cost(1.0, 2.0, 3))),
        Lost(1, LossCause.CRASH, "gone"), Hello(5, "host", 1), Cancel(1, "timeout"), Sweep()]
    assert {type(m) for m in messages} == set(CHANNEL_WIRE)
    for message in messages:
        data = to_wire(message)
        assert b"\n" not in data
        assert json.loads(data)["type"] == type(message).__name__
        assert from_wire(data, CHANNEL_WIRE) == message
    assert json.loads(to_wire(Finished(1, Outcome(OutcomeStatus.COMPLETED)))) == {
        "type": "Finished", "dispatch_id": 1, "outcome": {"status": "completed"}}
    for garbage in (b"", b"[1, 2]", b'{"type": "Nope"}', b'{"type": "Started", "pid": "x"}', b"\xff"):
        with pytest.raises(ValueError):
            from_wire(garbage, CHANNEL_WIRE)
    with pytest.raises(ValueError):  # a loky channel message is not one of the shared ones
        from_wire(to_wire(Sweep()))
