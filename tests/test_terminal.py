"""What the terminal shows tells the truth, and `parroles sql` stays in its box (one test per defect fixed)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from waiting import runs_with_status, wait_until

from parroles import ConfigError, Ledger, ParallelRoleConfig, RunStatus, execute_roles_parallel
from parroles.ledger.schema import RUN_COLUMNS
from parroles.results import Reason

WAIT = 60.0
ROLES = """
import math, sys, time
import parroles

def ok():
    return {"ratio": 0.5}

def chatty():
    for i in range(50):
        print("line", i, "of a role that prints a lot of lines to a closed pipe", flush=True)
    return "chatty"

def boom():
    time.sleep(0.5)
    raise ValueError("planned failure")

def wait_for_cancel():
    ctx = parroles.context()
    deadline = time.monotonic() + 60
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx.check_cancelled()

def deaf():
    time.sleep(60)  # never looks at cancellation: stopped by the parent once cancel_grace is over
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "termroles.py").write_text(ROLES)
    return tmp_path


def spec(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def parroles(*args: str, stdin: str | None = None, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parroles", *args], input=stdin, capture_output=True, text=True,
                          timeout=WAIT, **kwargs)


@pytest.fixture
def ledger(project: Path) -> Path:
    path = project / "l.duckdb"
    done = parroles("run", str(spec(project, '[[roles]]\nname = "a"\ncall = "termroles:ok"\n')), "--ledger",
                    str(path))
    assert done.returncode == 0, done.stderr
    return path


def test_an_interrupted_run_prints_its_summary_and_batch_id(project):
    """Item 3: after Ctrl-C, the summary and the batch id, as for any other ending, then exit 130."""
    path = project / "l.duckdb"
    waiting = spec(project, """
        [batch]
        max_concurrent = 2
        [[roles]]
        name = "w1"
        call = "termroles:wait_for_cancel"
        [[roles]]
        name = "w2"
        call = "termroles:wait_for_cancel"
        [[roles]]
        name = "queued"
        call = "termroles:ok"
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(waiting), "--ledger", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: runs_with_status(path, "RUNNING") == 2, what="two runs RUNNING")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    assert "parroles: interrupted" in err
    assert "batch spec-" in out and "interrupted" in out
    summary = out[re.search(r"^role +status +duration", out, re.M).start():]  # after a line per role as it ended
    rows = [line.split() for line in summary.splitlines()[2:5]]
    assert [(row[0], row[1]) for row in rows] == [("w1", "CANCELLED"), ("w2", "CANCELLED"), ("queued", "CANCELLED")]
    assert all(any(cell.startswith("interrupted") for cell in row) for row in rows), out


@pytest.mark.parametrize("start_method", ["loky", "forkserver"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_group_cancels_the_running_roles(project, start_method, signum):
    """A terminal's Ctrl-C or a supervisor's `kill -TERM -- -PGID` reaches the fork server too: it must outlive
    the signal, or the running roles are lost with it and recorded as crashes instead of as cancelled."""
    path = project / "l.duckdb"
    waiting = spec(project, f"""
        [batch]
        max_concurrent = 2
        cancel_grace = 0.5
        start_method = "{start_method}"
        [[roles]]
        name = "w1"
        call = "termroles:deaf"
        [[roles]]
        name = "w2"
        call = "termroles:deaf"
        [[roles]]
        name = "queued"
        call = "termroles:ok"
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(waiting), "--ledger", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: runs_with_status(path, "RUNNING") == 2, what="two runs RUNNING")
        os.killpg(proc.pid, signum)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err, err
    reason = Reason.INTERRUPTED if signum == signal.SIGINT else Reason.TERMINATED
    with Ledger(path, read_only=True) as opened:
        runs = {r.role: r for r in opened.list_runs()}
    assert {name: (r.status, r.reason) for name, r in runs.items()} == {
        name: (RunStatus.CANCELLED, reason) for name in ("w1", "w2", "queued")}


def test_a_failing_command_shows_its_last_stderr_lines(project):
    """Item 4: the lines a failing command wrote to stderr, indented under its role."""
    failing = spec(project, """
        [[roles]]
        name = "cmd"
        command = ["python", "-c", "import sys; print('first problem', file=sys.stderr); print('second problem', file=sys.stderr); sys.exit(3)"]
    """)
    done = parroles("run", str(failing), "--ledger", str(project / "l.duckdb"))
    assert done.returncode == 1
    assert "exited with code 3" in done.stdout
    assert "    first problem" in done.stdout and "    second problem" in done.stdout


def test_a_role_cancelled_before_it_started_shows_its_reason(project):
    """Item 5: `CANCELLED fixer  fail_fast`, in the line as it ends and in the summary."""
    failfast = spec(project, """
        [batch]
        fail_fast = true
        max_concurrent = 1
        [[roles]]
        name = "tester"
        call = "termroles:boom"
        [[roles]]
        name = "fixer"
        call = "termroles:ok"
    """)
    done = parroles("run", str(failfast), "--ledger", str(project / "l.duckdb"))
    assert done.returncode == 1
    lines = [line for line in done.stdout.splitlines() if "fixer" in line]
    assert len(lines) == 2 and all("CANCELLED" in line and "fail_fast" in line for line in lines), done.stdout


def test_sql_keeps_duckdbs_whole_error(ledger):
    """Item 8: the candidate bindings and the LINE 1: caret are not cut away."""
    done = parroles("sql", "SELECT rolee FROM runs", "--ledger", str(ledger))
    assert done.returncode == 2
    assert "Candidate bindings" in done.stderr and "LINE 1:" in done.stderr and "^" in done.stderr


def test_an_unreachable_scheduler_is_one_line_and_exit_5(project):
    """Item 10: one line naming the address, exit 5, within --connect-timeout."""
    pytest.importorskip("distributed")
    done = parroles("run", str(spec(project, '[[roles]]\nname = "a"\ncall = "termroles:ok"\n')), "--ledger",
                    str(project / "l.duckdb"), "--scheduler", "tcp://127.0.0.1:1", "--connect-timeout", "1")
    assert done.returncode == 5, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "tcp://127.0.0.1:1" in done.stderr
    assert not (project / "l.duckdb").exists()


def test_sql_reads_its_query_from_stdin_a_file_or_an_argument_starting_with_a_comment(ledger, tmp_path):
    """Item 11: like sqlite3 and duckdb."""
    query = "-- how many runs\nSELECT count(*) AS n FROM runs"
    from_argument = parroles("sql", query, "--ledger", str(ledger), "--format", "csv")
    from_stdin = parroles("sql", "--ledger", str(ledger), "--format", "csv", stdin=query)
    from_dash = parroles("sql", "-", "--ledger", str(ledger), "--format", "csv", stdin=query)
    (tmp_path / "q.sql").write_text(query)
    from_file = parroles("sql", "--file", str(tmp_path / "q.sql"), "--ledger", str(ledger), "--format", "csv")
    for done in (from_argument, from_stdin, from_dash, from_file):
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["n", "1"]


def test_ledger_is_accepted_on_the_group_too(ledger, tmp_path):
    """Item 12: `parroles --ledger X batches`, and a command's own --ledger wins over the group's."""
    done = parroles("--ledger", str(ledger), "batches", env=os.environ | {"PARROLES_LEDGER": "/nonexistent.duckdb"})
    assert done.returncode == 0 and "spec-" in done.stdout, done.stderr
    done = parroles("--ledger", "/nonexistent.duckdb", "runs", "--ledger", str(ledger))
    assert done.returncode == 0 and "COMPLETED" in done.stdout, done.stderr


def test_a_closed_stdout_does_not_stop_the_roles(project):
    """Item 13: `parroles run ... | head -c 100`: every role runs to its end and is recorded."""
    many = spec(project, "[batch]\nmax_concurrent = 2\n" + "".join(
        f'[[roles]]\nname = "r{i}"\ncall = "termroles:ok"\n' for i in range(12)))
    path = project / "l.duckdb"
    closed = subprocess.run(f"set -o pipefail; {sys.executable} -m parroles run {many} --ledger {path} | head -c 20",
                            shell=True, capture_output=True, text=True, timeout=WAIT, executable="/bin/bash")
    assert closed.returncode == 0, closed.stderr
    assert "Traceback" not in closed.stderr and "BrokenPipe" not in closed.stderr
    with Ledger(path, read_only=True) as opened:
        batches = opened.list_batches()
        assert len(batches) == 1
        assert [r.status for r in opened.list_runs(batches[0].batch_id)] == [RunStatus.COMPLETED] * 12


def test_json_output_is_strict(ledger):
    """Item 14: NaN and infinities are null, never NaN/Infinity."""
    done = parroles("sql", "SELECT 'NaN'::DOUBLE AS a, 'inf'::DOUBLE AS b, 1.5::DOUBLE AS c", "--ledger", str(ledger),
                    "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}")) == [
        {"a": None, "b": None, "c": 1.5}]


SHOW_KEYS = [name for name, _ in RUN_COLUMNS]  # the runs table's own columns (issue 21 item 6)


def test_show_gives_one_documented_view(ledger):
    """Item 15: the README's keys, nulls as null in JSON and '-' in text; exact values in JSON (issue 21)."""
    (run_id,) = json.loads(parroles("sql", "SELECT run_id FROM runs", "--ledger", str(ledger), "--format",
                                    "json").stdout)[0].values()
    as_json = json.loads(parroles("show", run_id, "--ledger", str(ledger), "--json").stdout)
    assert list(as_json["run"]) == SHOW_KEYS
    with Ledger(ledger) as opened:
        assert as_json["run"]["duration_ms"] == opened.get_run(run_id).summary.duration_ms
    text = parroles("show", run_id, "--ledger", str(ledger)).stdout
    assert "None" not in text and "null" not in text.split("output")[0]
    shown = [key for key in SHOW_KEYS if key not in ("output", "error")]
    assert [line.split(":")[0].strip() for line in text.splitlines()[:len(shown)]] == shown
    root = Path(__file__).parent.parent  # the README and the reference it links (docs/ledger.md: the columns)
    documented = "\n".join(page.read_text() for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    assert all(f"`{key}`" in documented for key in SHOW_KEYS)


def test_bad_role_names_are_config_errors(ledger_path):
    """Item 17: every error parroles raises is in its tree."""
    for bad in (5, "", "   "):
        with pytest.raises(ConfigError):
            execute_roles_parallel(ledger_path, f"bad-{bad!r}", [bad], "0" * 64, ParallelRoleConfig(), print)


def test_sql_streams_and_caps_what_it_prints(ledger):
    """Item 18: ten billion rows neither fill memory nor the terminal: --max-rows, with a note."""
    done = parroles("sql", "SELECT * FROM range(10000000000)", "--ledger", str(ledger), "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 10_000
    assert "only the first 10000 rows" in done.stderr
    done = parroles("sql", "SELECT * FROM range(100)", "--ledger", str(ledger), "--max-rows", "5", "--format", "csv")
    assert done.stdout.split() == ["range", "0", "1", "2", "3", "4"]


@pytest.mark.parametrize("query", ["UPDATE EXTENSIONS", "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
                                   "EXPLAIN ANALYZE CHECKPOINT", "EXPLAIN ANALYZE VACUUM",
                                   "EXPLAIN ANALYZE CREATE TEMP MACRO m(x) AS x"])
def test_sql_refuses_unknown_statements_and_explain_analyze_of_anything_but_a_select(ledger, query):
    """Items 19 and 20: refused with exit 2, one message, no traceback; the ledger unchanged."""
    before = ledger.read_bytes()
    done = parroles("sql", query, "--ledger", str(ledger))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("parroles: error:") and "Traceback" not in done.stderr
    assert ledger.read_bytes() == before


def test_sql_explain_analyze_of_a_select_runs(ledger):
    done = parroles("sql", "EXPLAIN ANALYZE SELECT count(*) FROM runs", "--ledger", str(ledger))
    assert done.returncode == 0, done.stderr


def test_sql_never_spills_beside_the_ledger(ledger):
    """Item 21: a query over the memory cap fails (exit 2) instead of writing <ledger>.tmp/."""
    done = parroles("sql", "SELECT list(i) FROM range(300000000) t(i)", "--ledger", str(ledger))
    assert done.returncode == 2, done.stderr
    assert not Path(f"{ledger}.tmp").exists()
    assert sorted(p.name for p in ledger.parent.iterdir() if p.name.startswith(ledger.name)) == [ledger.name]


@pytest.mark.parametrize("option", ["--query-timeout", "--timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_sql_timeout_must_be_finite_and_positive(ledger, value, option):
    """Item 22; issue 22: --query-timeout, the old --timeout still taken."""
    done = parroles("sql", "SELECT 1", "--ledger", str(ledger), option, value)
    assert done.returncode == 2 and option in done.stderr


def test_sqls_old_timeout_spelling_works_and_says_it_is_old(ledger):
    done = parroles("sql", "SELECT 1 AS one", "--ledger", str(ledger), "--timeout", "5")
    assert done.returncode == 0 and "--query-timeout" in done.stderr and done.stdout.split()[-1] == "1"


def test_the_failfast_example_does_what_it_says(tmp_path):
    """Item 23: the long reviewer starts, notices cancelled() and stops, every time."""
    root = Path(__file__).parent.parent
    path = tmp_path / "l.duckdb"
    done = parroles("run", str(root / "examples" / "failfast.toml"), "--ledger", str(path), "--json")
    assert done.returncode == 1, done.stderr
    results = {r["role"]: r for r in json.loads(done.stdout)["results"]}
    assert results["tester"]["status"] == "FAILED"
    assert results["reviewer"]["status"] == "CANCELLED" and results["reviewer"]["reason"] == Reason.FAIL_FAST.value
    with Ledger(path, read_only=True) as opened:
        reviewer = opened.get_run(results["reviewer"]["run_id"])
    assert reviewer.started_at is not None, "the reviewer must have started before it was cancelled"


DASK_SPEC = """
[batch]
max_concurrent = 2
backend = "dask"
[[roles]]
name = "a"
call = "termroles:wait_for_cancel"
[[roles]]
name = "b"
call = "termroles:wait_for_cancel"
[[roles]]
name = "c"
call = "termroles:ok"
"""


def test_ctrl_c_on_the_dask_backend_stops_cooperative_roles_quietly(project):
    """Item 9: Ctrl-C to the whole group: roles stop cooperatively (never killed after the grace), exit 130,
    a short output without tracebacks."""
    pytest.importorskip("distributed")
    path = project / "l.duckdb"
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(spec(project, DASK_SPEC)), "--ledger",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: runs_with_status(path, "RUNNING") == 2, what="two runs RUNNING")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and len(out.splitlines()) < 30, out
    with Ledger(path, read_only=True) as opened:
        runs = {r.role: r for r in opened.list_runs()}
    assert {r.status for r in runs.values()} == {RunStatus.CANCELLED}
    assert {r.reason for r in runs.values()} == {Reason.INTERRUPTED}
    for name in ("a", "b"):  # stopped by their own check, not restarted after the grace
        assert runs[name].error.type.endswith("RoleCancelled"), runs[name].error


def _emit_a_set(role: Any, run_id: str) -> str:
    import parroles as p

    p.context().emit("fine", {"n": 1})
    p.context().emit("step", {"seen": {1, 2}})  # a set is not JSON
    return "never"


def test_an_event_that_is_not_json_is_named_with_its_kind(run_batch):
    """Item 6: the message names the event and its kind, not the output; reason stays error."""
    results, _ = run_batch(["a"], _emit_a_set)
    (result,) = results
    assert result.status is RunStatus.FAILED and result.reason is Reason.ERROR
    assert result.error.type == "parroles.EventPayloadError"
    assert "event 2 ('step')" in result.error.message and "output" not in result.error.message
