"""Reuse, resume and why: the ledger's completed runs taken instead of running again, and only when nothing changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from waiting import runs_with_status, wait_until

import parroles
from parroles import Ledger, Reason, Role, RunNotFoundError
from parroles.backends.loky.backend import LokyBackend
from parroles.cli import cli
from parroles.ledger.why import explain

WAIT = 60


def no_workers(*_: Any, **__: Any) -> Any:
    raise AssertionError("a worker was started although every role was reused")


def pipeline(tmp_path: Path, p: int = 1, version: str = "1", body: str = "x + 1") -> list[Role]:
    """a(p) -> b; c reads a file; d has a version; e's code is made from ``body``."""
    namespace: dict[str, Any] = {"__name__": "generated"}
    exec(f"def e(x):\n    return {body}\n", namespace)
    return [
        Role("a", lambda p: {"p": p}, params={"p": p}),
        Role("b", lambda: parroles.context().inputs["a"], needs=["a"]),
        Role("c", lambda: "read", inputs=[str(tmp_path / "data" / "*.csv")]),
        Role("d", lambda: "versioned", version=version),
        Role("e", namespace["e"], params={"x": 1}),
    ]


def run(ledger: Path, roles: list[Role], **config: Any) -> parroles.BatchResult:
    return parroles.run(roles, ledger=ledger, max_concurrent=2, **config)


def reused(result: parroles.BatchResult) -> list[str]:
    return [str(r.role) for r in result if r.reason is Reason.REUSED]


def test_each_changed_part_runs_exactly_what_it_should_and_why_names_it(tmp_path, ledger_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1\n")
    first = run(ledger_path, pipeline(tmp_path))
    assert first.ok and reused(first) == []

    monkeypatch.setattr(LokyBackend, "open", no_workers)
    again = run(ledger_path, pipeline(tmp_path), reuse=True)
    assert reused(again) == ["a", "b", "c", "d", "e"]
    assert [r.output for r in again] == [r.output for r in first]
    assert [r.reused_from for r in again] == [r.run_id for r in first]
    monkeypatch.undo()

    cases = [  # (what changes, roles that run again, what why says of the first of them)
        (dict(p=2), ["a", "b"], "params.p 1 → 2"),
        (dict(p=2, version="2"), ["d"], "version 1 → 2"),
        (dict(p=2, version="2", body="x + 2"), ["e"], "code of generated:e changed"),
    ]
    for change, ran, said in cases:
        result = run(ledger_path, pipeline(tmp_path, **change), reuse=True)
        assert [str(r.role) for r in result if r.reason is not Reason.REUSED] == ran, change
        with Ledger(ledger_path, read_only=True) as ledger:
            assert said in explain(ledger, result.by_role[ran[0]].run_id).differences
            if ran == ["a", "b"]:  # b's input changed because a's output did
                assert any(line.startswith("input from a changed: digest ")
                           for line in explain(ledger, result.by_role["b"].run_id).differences)
    (tmp_path / "data" / "x.csv").write_text("2\n")
    result = run(ledger_path, pipeline(tmp_path, p=2, version="2", body="x + 2"), reuse=True)
    assert [str(r.role) for r in result if r.reason is not Reason.REUSED] == ["c"]
    with Ledger(ledger_path, read_only=True) as ledger:
        assert f"{tmp_path / 'data' / 'x.csv'} changed" in explain(ledger, result.by_role["c"].run_id).differences


def test_closures_and_cache_includes_decide_reuse(ledger_path):
    def make(scale: int, helper: Any) -> Role:
        return Role("scaled", lambda: helper(scale), cache_includes=[helper])

    def double(x: int) -> int:
        return 2 * x

    def triple(x: int) -> int:
        return 3 * x

    assert run(ledger_path, [make(2, double)]).ok
    assert reused(run(ledger_path, [make(2, double)], reuse=True)) == ["scaled"]
    assert reused(run(ledger_path, [make(3, double)], reuse=True)) == []  # a closure value changed
    assert reused(run(ledger_path, [make(3, triple)], reuse=True)) == []  # the included helper changed


def test_unencodable_params_are_recorded_not_reusable(ledger_path):
    roles = [Role("odd", lambda values: sorted(values), params={"values": {3, 1, 2}})]
    first = run(ledger_path, roles)
    second = run(ledger_path, roles, reuse=True)
    assert first.ok and second.ok and reused(second) == []
    with Ledger(ledger_path, read_only=True) as ledger:
        record = ledger.get_run(second[0].run_id)
    assert record.cache_key is None
    assert "params have no canonical JSON" in record.cache_parts["not_reusable"]


def test_reuse_never_crosses_ledgers_and_a_named_batch_limits_it(tmp_path, ledger_path):
    roles = [Role("a", lambda: 1)]
    first = run(ledger_path, roles)
    assert reused(run(tmp_path / "other.duckdb", roles, reuse=True)) == []
    second = run(ledger_path, roles)  # a second completed run of the same key, in another batch
    limited = run(ledger_path, roles, reuse=first.batch_id[:12])
    assert limited[0].reused_from == first[0].run_id != second[0].run_id
    with Ledger(ledger_path, read_only=True) as ledger:
        assert ledger.get_batch(limited.batch_id).resumed_from == first.batch_id
        before = len(ledger.list_batches())
    with pytest.raises(RunNotFoundError):
        run(ledger_path, roles, reuse="no-such-batch")
    with Ledger(ledger_path, read_only=True) as ledger:
        assert len(ledger.list_batches()) == before  # nothing written


SWEEP = """\
[batch]
max_concurrent = 2
[[roles]]
name = "train"
call = "work:train"
matrix = {{ lr = [0.1, 1.0] }}
[[roles]]
name = "report"
call = "work:report"
needs = ["train"]
on_failed_needs = "run"
{extra}
"""
WORK = """\
import os, pathlib
def train(lr):
    if lr > 0.5 and os.path.exists(os.environ.get("PARROLES_TEST_FAIL", "/nonexistent")):
        raise ValueError("diverged")
    return {"loss": lr * 2}
def report():
    import parroles
    return sorted(parroles.context().inputs)
def gate():
    import parroles
    pathlib.Path(os.environ["PARROLES_TEST_STARTED"]).touch()
    while not parroles.context().cancelled():
        parroles.context().check_cancelled()
"""


def project(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "work.py").write_text(WORK)
    spec = tmp_path / "sweep.toml"
    spec.write_text(SWEEP.format(extra=textwrap.dedent(extra)))
    return spec


def cli_run(*args: str) -> Any:
    """The command's result: its ``stdout`` and ``stderr`` apart (click 8.2)."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def batch_runs(ledger: Path, batch_id: str) -> dict[str, tuple[str, str | None]]:
    with Ledger(ledger, read_only=True) as led:
        return {str(r.role): (r.status.value, r.reason.value if r.reason else None)
                for r in led.list_runs(parent_run_id=batch_id)}


def newest_batch(ledger: Path) -> str:
    with Ledger(ledger) as led:  # writable: what a killed parent left in its journal is applied first
        return led.list_batches(limit=1)[0].batch_id


def test_a_failed_sweep_point_resumed_runs_alone_then_the_fan_in(tmp_path, monkeypatch):
    spec, ledger = project(tmp_path), tmp_path / "l.duckdb"
    flag = tmp_path / "fail"  # a file, not the variable itself: warm workers keep the environment they started in
    monkeypatch.setenv("PARROLES_TEST_FAIL", str(flag))
    flag.touch()
    assert cli_run("run", str(spec), "--ledger", str(ledger), "-q").exit_code == 1
    failed = newest_batch(ledger)
    flag.unlink()
    resumed = cli_run("resume", failed[:10], "--ledger", str(ledger), "--json")
    assert resumed.exit_code == 0, resumed.output
    batch_id = json.loads(resumed.stdout)["batch_id"]
    assert batch_runs(ledger, batch_id) == {"train[lr=0.1]": ("COMPLETED", "reused"),
                                            "train[lr=1.0]": ("COMPLETED", None), "report": ("COMPLETED", None)}
    with Ledger(ledger, read_only=True) as led:
        assert led.get_batch(batch_id).resumed_from == failed
        assert led.get_batch(batch_id).spec_path == str(spec.resolve())
    # Nothing changed since: a second resume reuses every role, from the batch it names.
    again = cli_run("resume", batch_id, "--ledger", str(ledger), "--json")
    assert {reason for _, reason in batch_runs(ledger, json.loads(again.stdout)["batch_id"]).values()} == {"reused"}
    # The spec changed: said so, and run as it is now.
    spec.write_text(SWEEP.format(extra="") + "\n# a comment\n")
    changed = CliRunner().invoke(cli, ["resume", batch_id, "--ledger", str(ledger), "-q"])
    assert changed.exit_code == 0 and "changed since batch" in changed.stderr


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_or_killed_batch_resumed(tmp_path, how):
    spec = project(tmp_path, extra='[[roles]]\nname = "gate"\ncall = "work:gate"\nneeds = ["report"]\n')
    ledger, started = tmp_path / "l.duckdb", tmp_path / "started"
    env = os.environ | {"PARROLES_TEST_STARTED": str(started)}
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(spec), "--ledger", str(ledger), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(started.exists, WAIT, what="the gate role to start")
        # What a kill -9 may lose is the last group window: the gate's start is committed first (docs/ledger.md).
        wait_until(lambda: runs_with_status(ledger, "RUNNING") == 1, WAIT, what="the gate's start to be committed")
        os.killpg(proc.pid, how) if how == signal.SIGKILL else proc.send_signal(how)
        proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(WAIT)
    first = newest_batch(ledger)
    spec.write_text(SWEEP.format(extra=""))  # the gate goes: the rest is what the batch had completed
    resumed = cli_run("resume", first, "--ledger", str(ledger), "--json")
    assert resumed.exit_code == 0, resumed.output
    runs = batch_runs(ledger, json.loads(resumed.stdout)["batch_id"])
    assert runs == {"train[lr=0.1]": ("COMPLETED", "reused"), "train[lr=1.0]": ("COMPLETED", "reused"),
                    "report": ("COMPLETED", "reused")}


def test_bad_resumes_are_clear_errors_that_write_nothing(tmp_path, ledger_path):
    api = run(ledger_path, [Role("a", lambda: 1)])
    unknown = CliRunner().invoke(cli, ["resume", "no-such", "--ledger", str(ledger_path)])
    assert unknown.exit_code == 4 and "no batch" in unknown.stderr
    from_api = CliRunner().invoke(cli, ["resume", api.batch_id, "--ledger", str(ledger_path)])
    assert from_api.exit_code == 2 and "recorded no spec file" in from_api.stderr
    assert f"reuse={api.batch_id!r}" in from_api.stderr
    with Ledger(ledger_path, read_only=True) as ledger:
        assert [b.batch_id for b in ledger.list_batches()] == [api.batch_id]


def test_why_on_the_command_line(tmp_path, ledger_path):
    first = run(ledger_path, [Role("a", lambda p: p, params={"p": 1})])
    second = run(ledger_path, [Role("a", lambda p: p, params={"p": 2})], reuse=True)
    said = cli_run("why", second[0].run_id[:8], "--ledger", str(ledger_path))
    assert said.exit_code == 0 and "params.p 1 → 2" in said.output and first[0].run_id in said.output
    data = json.loads(cli_run("why", second[0].run_id, "--ledger", str(ledger_path), "--json").stdout)
    assert data["against"] == first[0].run_id and data["differences"] == ["params.p 1 → 2"]
    assert data["parts"]["params"] == {"p": 2} and len(data["cache_key"]) == 64
    third = run(ledger_path, [Role("a", lambda p: p, params={"p": 2})], reuse=True)
    same = cli_run("why", third[0].run_id, "--ledger", str(ledger_path))
    assert f"reused from run {second[0].run_id}" in same.output and "same key: nothing differs" in same.output


def test_read_commands_bring_an_older_ledger_up_to_date(tmp_path):
    """A ledger an older parroles wrote (schema 5: no cost columns) is migrated by the first read command."""
    import duckdb

    from parroles.ledger.schema import MIGRATIONS, VERSION_TABLE

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(VERSION_TABLE)
    for number, migration in enumerate(MIGRATIONS[:5], start=1):
        con.execute(migration)
        con.execute("INSERT INTO schema_version VALUES (?, now())", [number])
    con.close()
    listed = cli_run("runs", "--ledger", str(path))
    assert listed.exit_code == 0, listed.output
    with Ledger(path, read_only=True) as ledger:
        assert ledger.schema_version == len(MIGRATIONS)


def test_why_of_a_run_without_a_key_says_so(ledger_path):
    import duckdb

    first = run(ledger_path, [Role("a", lambda: 1), Role("b", lambda: 2, needs=["a"])])
    con = duckdb.connect(str(ledger_path))  # as an older parroles left it: no key
    con.execute("UPDATE runs SET cache_parts = NULL, cache_key = NULL WHERE role = 'b'")
    con.close()
    said = cli_run("why", first.by_role["b"].run_id, "--ledger", str(ledger_path))
    assert said.exit_code == 0 and "no cache key recorded" in said.output
