"""The command line: exit codes, the ledger it leaves, and refusals that change nothing."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from waiting import runs_with_status, wait_until

from parroles import Ledger, RunStatus
from parroles.backends.loky import pool as loky_pool
from parroles.cli import cli
from parroles.ledger.schema import TABLES
from parroles.results import Reason

ROOT = Path(__file__).parent.parent
WAIT = 60.0

ROLES_MODULE = """
import time
import parroles

def ok(label="x"):
    parroles.context().emit("note", {"label": label})
    return {"label": label}

def boom():
    raise ValueError("planned failure")

def wait_for_cancel():
    ctx = parroles.context()
    deadline = time.monotonic() + 60
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx.check_cancelled()

NOT_CALLABLE = 42
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "myroles.py").write_text(ROLES_MODULE)
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('broken module')\n")
    return tmp_path


def write_spec(folder: Path, text: str) -> Path:
    path = folder / "spec.toml"
    path.write_text(textwrap.dedent(text))
    return path


GOOD_SPEC = """
[batch]
name = "good"
max_concurrent = 2

[[roles]]
name = "planner"
call = "myroles:ok"
params = { label = "plan" }

[[roles]]
name = "coder"
call = "myroles:ok"

[[roles]]
name = "shell"
command = ["python", "-c", "print('hello from a command')"]
"""


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_run_records_every_role_and_exits_0(project):
    ledger = project / "l.duckdb"
    result = invoke("run", str(write_spec(project, GOOD_SPEC)), "--ledger", str(ledger), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [r["status"] for r in summary["results"]] == ["COMPLETED"] * 3
    with Ledger(ledger) as opened:
        runs = opened.list_runs(summary["batch_id"])
        batch = opened.get_batch(summary["batch_id"])
    assert [r.status for r in runs] == [RunStatus.COMPLETED] * 3
    assert runs[0].output == {"label": "plan"}
    assert runs[2].output["exit_code"] == 0
    assert runs[2].output["stdout_tail"] == ["hello from a command"]
    assert batch.name == "good"
    assert batch.spec_digest == hashlib.sha256((project / "spec.toml").read_bytes()).hexdigest()


def test_options_override_the_spec(project):
    ledger = project / "l.duckdb"
    result = invoke("run", str(write_spec(project, GOOD_SPEC)), "--ledger", str(ledger), "--max-concurrent", "1",
                    "--fail-fast", "--timeout", "30", "--quiet")
    assert result.exit_code == 0, result.output
    with Ledger(ledger) as opened:
        config = opened.list_batches()[0].config
    assert (config["max_concurrent"], config["fail_fast"], config["role_timeout"]) == (1, True, 30.0)


def test_a_failing_role_exits_1_and_fail_fast_cancels(project):
    spec = write_spec(project, """
        [batch]
        fail_fast = true
        max_concurrent = 2
        cancel_grace = 30
        [[roles]]
        name = "waiter"
        call = "myroles:wait_for_cancel"
        [[roles]]
        name = "tester"
        call = "myroles:boom"
        [[roles]]
        name = "fixer"
        call = "myroles:ok"
        [[roles]]
        name = "failing-command"
        command = ["python", "-c", "import sys; sys.exit(3)"]
    """)
    ledger = project / "l.duckdb"
    result = invoke("run", str(spec), "--ledger", str(ledger))
    assert result.exit_code == 1
    assert "planned failure" in result.output
    with Ledger(ledger) as opened:
        statuses = [r.status for r in opened.list_runs(opened.list_batches()[0].batch_id)]
    assert statuses == [RunStatus.CANCELLED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.CANCELLED]


def test_a_failing_command_reports_its_exit_code(project):
    spec = write_spec(project, """
        [[roles]]
        name = "failing-command"
        command = ["python", "-c", "import sys; print('bad', file=sys.stderr); sys.exit(3)"]
    """)
    result = invoke("run", str(spec), "--ledger", str(project / "l.duckdb"), "--json")
    assert result.exit_code == 1
    error = json.loads(result.output)["results"][0]["error"]
    assert "exited with code 3" in error["message"] and "bad" in error["message"]


BAD_SPECS = {
    "unknown batch key": ("[batch]\nmax_concurency = 2\n[[roles]]\nname='a'\ncall='myroles:ok'\n",
                          "unknown key 'max_concurency'; did you mean 'max_concurrent'?"),
    "misspelt need": ("[[roles]]\nname='planner'\ncall='myroles:ok'\n[[roles]]\nname='b'\ncall='myroles:ok'\n"
                      "needs=['planer']\n", "role 'b' needs 'planer', which is no role of the spec; did you mean 'planner'?"),
    "unknown role key": ("[[roles]]\nname='a'\ncall='myroles:ok'\nretires=3\n",
                         "role 'a': unknown key 'retires'; did you mean 'retries'?"),
    "bad retry_on": ("[[roles]]\nname='a'\ncall='myroles:ok'\nretry_on=['exit:x']\n",
                     "role 'a': retry_on: 'exit:x' is no exit code"),
    "call without colon": ("[[roles]]\nname='a'\ncall='myroles.ok'\n", "role 'a': call must look like"),
    "unknown module": ("[[roles]]\nname='a'\ncall='nosuchmodule:ok'\n", "role 'a': no module named 'nosuchmodule'"),
    "missing attribute": ("[[roles]]\nname='a'\ncall='myroles:nothing'\n", "role 'a': module 'myroles' has no attribute"),
    "not callable": ("[[roles]]\nname='a'\ncall='myroles:NOT_CALLABLE'\n", "role 'a': myroles:NOT_CALLABLE is not callable"),
    "module raises": ("[[roles]]\nname='a'\ncall='raises_on_import:x'\n", "role 'a': module 'raises_on_import' raised on import"),
    "both call and command": ("[[roles]]\nname='a'\ncall='myroles:ok'\ncommand=['true']\n", "role 'a': give exactly one"),
    "neither call nor command": ("[[roles]]\nname='a'\n", "role 'a': give exactly one"),
    "duplicate names": ("[[roles]]\nname='a'\ncall='myroles:ok'\n[[roles]]\nname='a'\ncall='myroles:ok'\n", "role 'a': duplicate name"),
    "max_concurrent 0": ("[batch]\nmax_concurrent = 0\n[[roles]]\nname='a'\ncall='myroles:ok'\n", "max_concurrent"),
    "max_concurrent -1": ("[batch]\nmax_concurrent = -1\n[[roles]]\nname='a'\ncall='myroles:ok'\n", "max_concurrent"),
    "max_concurrent a": ("[batch]\nmax_concurrent = 'a'\n[[roles]]\nname='a'\ncall='myroles:ok'\n", "max_concurrent"),
    "empty role list": ("[batch]\nname = 'x'\n", "no roles"),
    "not TOML": ("this is [not toml\n", "not a TOML file"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_specs_exit_2_and_write_nothing(project, case):
    text, message = BAD_SPECS[case]
    (project / "spec.toml").write_text(text)
    ledger = project / "l.duckdb"
    result = CliRunner().invoke(cli, ["run", str(project / "spec.toml"), "--ledger", str(ledger)])
    assert result.exit_code == 2
    assert message in result.output
    assert not ledger.exists()  # the ledger was never opened, so no worker ran either
    assert loky_pool.idle_pool() is None  # workers start only once the spec is valid


def test_a_spec_runs_its_workers_from_the_fork_server_unless_it_says_loky(project):
    from parroles.spec import load_spec

    assert load_spec(write_spec(project, GOOD_SPEC)).config().start_method == "forkserver"
    chosen = GOOD_SPEC.replace("max_concurrent = 2", 'max_concurrent = 2\nstart_method = "loky"')
    assert load_spec(write_spec(project, chosen)).config().start_method == "loky"
    bad = GOOD_SPEC.replace("max_concurrent = 2", 'max_concurrent = 2\nstart_method = "fork"')
    result = CliRunner().invoke(cli, ["run", str(write_spec(project, bad)), "--ledger", str(project / "l.duckdb")])
    assert result.exit_code == 2 and "start_method must be one of" in result.output


def test_a_start_method_is_for_the_loky_backend_only(project):
    # A spec on Dask gets no start method of its own; one it names is refused, not silently ignored.
    from parroles.spec import load_spec

    on_dask = GOOD_SPEC.replace("max_concurrent = 2", 'max_concurrent = 2\nbackend = "dask"')
    assert load_spec(write_spec(project, on_dask)).config().start_method == "loky"  # the field's inert default
    named = on_dask.replace('backend = "dask"', 'backend = "dask"\nstart_method = "forkserver"')
    result = CliRunner().invoke(cli, ["run", str(write_spec(project, named)), "--ledger", str(project / "l.duckdb")])
    assert result.exit_code == 2 and "start_method applies to the loky backend only" in result.output
    assert not (project / "l.duckdb").exists()


def test_every_problem_of_a_spec_is_reported(project):
    spec = write_spec(project, """
        [batch]
        max_concurrent = 0
        [[roles]]
        name = "a"
        call = "nope"
        [[roles]]
        name = "b"
        call = "myroles:missing"
    """)
    result = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(project / "l.duckdb")])
    assert result.exit_code == 2
    assert "3 problem(s)" in result.output
    assert "role 'a'" in result.output and "role 'b'" in result.output


def test_a_bad_option_is_a_usage_error(project):
    spec = write_spec(project, GOOD_SPEC)
    for option in (["--max-concurrent", "0"], ["--max-concurrent", "a"], ["--timeout", "-1"]):
        result = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(project / "l.duckdb"), *option])
        assert result.exit_code == 2, option
    assert not (project / "l.duckdb").exists()


# -- reading the ledger ---------------------------------------------------------------------


@pytest.fixture
def filled(project) -> tuple[Path, str]:
    ledger = project / "l.duckdb"
    result = invoke("run", str(write_spec(project, GOOD_SPEC)), "--ledger", str(ledger), "--json")
    return ledger, json.loads(result.output)["batch_id"]


def test_every_command_names_things_as_the_tables_do(filled):
    """Issue 21 item 6: runs --json, show --json and batches --json use the tables' column names."""
    ledger, batch_id = filled
    with duckdb.connect(str(ledger), read_only=True) as con:
        columns = {table: [name for (name,) in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]).fetchall()]
            for table in ("runs", "batches")}
    runs = json.loads(invoke("runs", "--ledger", str(ledger), "--batch", batch_id, "--json").output)
    shown = json.loads(invoke("show", runs[0]["run_id"], "--ledger", str(ledger), "--json").output)["run"]
    assert list(runs[0]) == columns["runs"] and list(shown) == columns["runs"] and shown == runs[0]
    (batch,) = json.loads(invoke("batches", "--ledger", str(ledger), "--json").output)
    assert set(batch) - {"counts"} == set(columns["batches"])
    (event, *_) = json.loads(invoke("show", runs[0]["run_id"], "--ledger", str(ledger), "--json").output)["events"]
    assert set(event) == {"run_id", "seq", "kind", "payload", "ts"}


def test_ids_may_be_given_by_their_start(filled):
    """Issue 21 item 7: a unique prefix works; an unknown id is exit 4; an ambiguous one exit 2, with candidates."""
    ledger, batch_id = filled
    runs = json.loads(invoke("runs", "--ledger", str(ledger), "--batch", batch_id[:-4], "--json").output)
    assert [r["role"] for r in runs] == ["planner", "coder", "shell"]
    shown = json.loads(invoke("show", runs[1]["run_id"][:8], "--ledger", str(ledger), "--json").output)
    assert shown["run"]["run_id"] == runs[1]["run_id"]
    missing = CliRunner().invoke(cli, ["runs", "--batch", "NOPE", "--ledger", str(ledger)])
    assert missing.exit_code == 4 and "no batch NOPE" in missing.output
    invoke("run", str(ledger.parent / "spec.toml"), "--ledger", str(ledger))  # a second batch of the same name
    ambiguous = CliRunner().invoke(cli, ["runs", "--batch", batch_id.split("-")[0], "--ledger", str(ledger)])
    assert ambiguous.exit_code == 2 and batch_id in ambiguous.output and "more than one batch" in ambiguous.output
    empty = CliRunner().invoke(cli, ["show", "", "--ledger", str(ledger)])
    assert empty.exit_code == 2 and "an empty run id" in empty.output  # an unset $ID never shows something


def test_logs_marks_its_streams_and_finds_a_run_by_batch_and_role(filled):
    ledger, batch_id = filled
    by_role = invoke("logs", "--batch", batch_id, "--role", "shell", "--ledger", str(ledger)).output.splitlines()
    assert by_role and all(line[:2] in ("| ", "! ") for line in by_role)
    (shell,) = json.loads(invoke("runs", "--ledger", str(ledger), "--role", "shell", "--json").output)
    assert invoke("logs", shell["run_id"], "--ledger", str(ledger)).output.splitlines() == by_role
    raw = invoke("logs", shell["run_id"], "--stream", "stdout", "--ledger", str(ledger)).output.splitlines()
    assert raw == [line[2:] for line in by_role if line.startswith("| ")]
    assert CliRunner().invoke(cli, ["logs", "--ledger", str(ledger)]).exit_code == 2


def test_graph_takes_ledger_like_every_command(project):
    result = invoke("graph", str(write_spec(project, GOOD_SPEC)), "--ledger", str(project / "unused.duckdb"))
    assert "planner" in result.output and not (project / "unused.duckdb").exists()


def test_runs_of_a_matrix_role_by_its_name(project):
    spec = write_spec(project, "[[roles]]\nname = 'train'\ncall = 'myroles:ok'\nmatrix = { label = ['p', 'q'] }\n")
    ledger = project / "m.duckdb"
    invoke("run", str(spec), "--ledger", str(ledger))
    found = json.loads(invoke("runs", "--role", "train", "--ledger", str(ledger), "--json").output)
    assert sorted(r["role"] for r in found) == ['train[label="p"]', 'train[label="q"]']
    assert {r["matrix_of"] for r in found} == {"train"} and {r["params"]["label"] for r in found} == {"p", "q"}


def test_batches_runs_and_show(filled):
    ledger, batch_id = filled
    listed = invoke("batches", "--ledger", str(ledger), "--json")
    assert json.loads(listed.output)[0]["counts"]["COMPLETED"] == 3
    runs = json.loads(invoke("runs", "--ledger", str(ledger), "--batch", batch_id, "--json").output)
    assert [r["role"] for r in runs] == ["planner", "coder", "shell"]
    only = json.loads(invoke("runs", "--ledger", str(ledger), "--role", "coder", "--json").output)
    assert [r["role"] for r in only] == ["coder"]
    shown = json.loads(invoke("show", runs[0]["run_id"], "--ledger", str(ledger), "--json").output)
    assert shown["events"][0]["payload"] == {"label": "plan"}
    text = invoke("show", runs[0]["run_id"], "--ledger", str(ledger)).output
    assert "note" in text and runs[0]["run_id"] in text


def test_show_or_trace_of_what_is_not_there_exits_4(filled, tmp_path):
    """Not found has its own code: 3 means the ledger itself is busy or broken."""
    ledger, _ = filled
    result = CliRunner().invoke(cli, ["show", "00000000-0000-0000-0000-000000000000", "--ledger", str(ledger)])
    assert result.exit_code == 4 and "no run" in result.output
    result = CliRunner().invoke(cli, ["show", "bogus", "--ledger", str(ledger)])
    assert result.exit_code == 4 and "no run" in result.output
    result = CliRunner().invoke(cli, ["trace", "no-such-batch", "-o", str(tmp_path / "t.json"), "--ledger",
                                      str(ledger)])
    assert result.exit_code == 4 and "no batch" in result.output


def test_sql_formats(filled):
    ledger, _ = filled
    query = "SELECT role, status FROM runs ORDER BY position"
    as_json = json.loads(invoke("sql", query, "--ledger", str(ledger), "--format", "json").output)
    assert as_json == [{"role": r, "status": "COMPLETED"} for r in ("planner", "coder", "shell")]
    as_csv = invoke("sql", query, "--ledger", str(ledger), "--format", "csv").output.splitlines()
    assert as_csv == ["role,status", "planner,COMPLETED", "coder,COMPLETED", "shell,COMPLETED"]
    assert "planner" in invoke("sql", query, "--ledger", str(ledger)).output


REFUSED = [
    "SELECT 1; COPY runs TO '{target}'",
    "COPY runs TO '{target}'",
    "EXPORT DATABASE '{target}'",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET lock_configuration = false",
    "SET enable_external_access = true",
    "ATTACH '{target}' AS other",
    "CREATE TABLE t (a INTEGER)",
    "DELETE FROM runs",
    "UPDATE runs SET status = 'COMPLETED'",
    "SELECT count(*) FROM glob('{folder}/*')",
]


@pytest.mark.parametrize("query", REFUSED)
def test_sql_refusals_change_nothing(filled, tmp_path, query):
    ledger, _ = filled
    secret = tmp_path / "secret.txt"
    secret.write_text("secret\n")
    target = tmp_path / "out" / "copy.csv"
    before = hashlib.sha256(ledger.read_bytes()).hexdigest()
    listing = sorted(p.name for p in ledger.parent.iterdir())
    result = CliRunner().invoke(cli, ["sql", query.format(target=target, secret=secret, folder=tmp_path),
                                      "--ledger", str(ledger)])
    assert result.exit_code == 2, result.output
    # One error; DuckDB's own refusals keep their whole text (the LINE 1: caret below the first line).
    assert result.output.startswith("parroles: error:") and result.output.count("parroles:") == 1
    assert "secret\n" not in result.output
    assert not target.exists() and not target.parent.exists()
    assert hashlib.sha256(ledger.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in ledger.parent.iterdir()) == listing


def test_sql_is_interrupted_past_its_timeout(filled):
    ledger, _ = filled
    result = CliRunner().invoke(cli, ["sql", "SELECT sum(a.range * b.range) FROM range(100000000) a, range(100) b",
                                      "--ledger", str(ledger), "--query-timeout", "0.5"])
    assert result.exit_code == 2
    assert "interrupted after the timeout of 0.5 s" in result.output


def test_export_writes_every_table_the_ledger_has(filled, tmp_path):
    """Issue 21 item 2: from the catalog, so a table a later migration adds is never left out."""
    ledger, _ = filled
    with duckdb.connect(str(ledger)) as con:  # as a future migration would; and a user's own, oddly named
        con.execute("CREATE TABLE future_table AS SELECT 42 AS answer")
        con.execute('CREATE SCHEMA other; CREATE TABLE other."../up" AS SELECT 1 AS a')
    for fmt in ("parquet", "csv"):
        folder = tmp_path / f"export-{fmt}"
        result = invoke("export", str(folder), "--ledger", str(ledger), "--format", fmt)
        assert result.exit_code == 0
        reader = "read_parquet" if fmt == "parquet" else "read_csv"
        with duckdb.connect() as con:
            for table in (*TABLES, "future_table"):
                (exported,) = con.execute(f"SELECT count(*) FROM {reader}('{folder / (table + '.' + fmt)}')").fetchone()
                with duckdb.connect(str(ledger), read_only=True) as source:
                    assert (exported,) == source.execute(f"SELECT count(*) FROM {table}").fetchone(), table
        assert {p.name for p in folder.iterdir()} == {f"{t}.{fmt}" for t in (*TABLES, "future_table",
                                                                            "other...%2Fup")}
    with duckdb.connect(str(ledger), read_only=True) as source:
        assert source.execute("SELECT count(*) FROM logs").fetchone()[0] > 0  # the table once left out


def test_sql_help_names_every_table():
    result = invoke("sql", "--help")
    assert all(table in " ".join(result.output.split()) for table in TABLES)


def test_trace_is_a_chrome_trace(filled, tmp_path):
    ledger, batch_id = filled
    out = tmp_path / "trace.json"
    assert invoke("trace", batch_id, "--ledger", str(ledger), "-o", str(out)).exit_code == 0
    events = json.loads(out.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    with Ledger(ledger) as opened:
        pids = {r.worker_pid for r in opened.list_runs(batch_id)}
    run_spans = [e for e in spans if e["pid"] == 1]
    assert {e["tid"] for e in run_spans} == pids  # one lane per worker pid
    assert {e["name"] for e in run_spans} == {"planner", "coder", "shell"}
    assert len([e for e in spans if e["cat"] == "queue"]) == 3
    assert [e["name"] for e in events if e["ph"] == "i"] == ["note", "note"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)


# -- a ledger in use, or broken -------------------------------------------------------------


def test_a_busy_ledger_is_named_with_its_holder(filled):
    ledger, _ = filled
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(ledger)!r})
        print("holding", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = CliRunner().invoke(cli, ["runs", "--ledger", str(ledger)])
        assert result.exit_code == 3
        assert f"ledger is busy: {ledger} is held by PID {holder.pid}" in result.output
    finally:
        holder.communicate("", timeout=WAIT)


def test_a_file_that_is_not_a_ledger_is_left_alone(project):
    junk = project / "junk.duckdb"
    junk.write_bytes(b"this is not a database" * 100)
    before = junk.read_bytes()
    for args in (["runs"], ["sql", "SELECT 1"], ["run", str(write_spec(project, GOOD_SPEC))]):
        result = CliRunner().invoke(cli, [*args, "--ledger", str(junk)])
        assert result.exit_code == 3, (args, result.output)
        assert result.output.count("\n") == 1
    assert junk.read_bytes() == before


def test_missing_and_unwritable_ledgers_exit_3(project):
    result = CliRunner().invoke(cli, ["runs", "--ledger", str(project / "missing.duckdb")])
    assert result.exit_code == 3 and "no ledger at" in result.output
    assert not (project / "missing.duckdb").exists()
    (project / "blocker").write_text("a file where a folder should be")
    result = CliRunner().invoke(cli, ["run", str(write_spec(project, GOOD_SPEC)),
                                      "--ledger", str(project / "blocker" / "l.duckdb")])
    assert result.exit_code == 3 and result.output.count("\n") == 1


# -- help, README, python -m ------------------------------------------------------------------


def test_the_spec_takes_every_config_field_that_makes_sense_in_one_and_refuses_the_rest(project):
    """Issue 22 item 4: [batch] keys and run's options come from ParallelRoleConfig's fields, never a copy."""
    import dataclasses

    from parroles.config import ParallelRoleConfig, run_options, spec_keys
    from parroles.spec import load_spec

    defaults = ParallelRoleConfig()
    for key, field in spec_keys().items():
        value = getattr(defaults, field)
        if value is None:
            continue  # TOML has no null: a key left out is its default
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        spec = write_spec(project, f"[batch]\n{key} = {text}\n[[roles]]\nname = 'a'\ncall = 'myroles:ok'\n")
        assert getattr(load_spec(spec).config(), field) == value, key
    assert {f.name for f in dataclasses.fields(ParallelRoleConfig)} - set(spec_keys().values()) == {"role_timeouts"}
    spec = write_spec(project, "[batch]\nrole_timeouts = 3\n[[roles]]\nname = 'a'\ncall = 'myroles:ok'\n")
    result = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(project / "l.duckdb")])
    assert result.exit_code == 2 and "unknown key 'role_timeouts'; did you mean 'role_timeout'?" in result.output
    shown = invoke("run", "--help").output
    for declaration, field in run_options():
        assert declaration.split("/")[0] in shown and field.metadata["help"][1:20] in " ".join(shown.split())


def test_every_command_has_help_and_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name, command in cli.commands.items():
        assert command.help, name
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
        assert f"parroles {name}" in readme, name
    help_text = invoke("--help").output
    for code in ("130", "143", "ledger error"):
        assert code in help_text


def test_python_dash_m_parroles():
    done = subprocess.run([sys.executable, "-m", "parroles", "--help"], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0 and "Usage: parroles" in done.stdout


@pytest.mark.parametrize(("args", "code"), [(["--help"], 0), (["show", "nothing-such", "--ledger", "{ledger}"], 3)])
def test_the_command_leaves_its_heap_frozen_for_exit_and_its_exit_code_and_atexit_handlers_as_they_were(
        tmp_path, args, code):
    """Issue 26: the interpreter's last collections skip a finished command's heap (~30 ms of every exit)."""
    script = ("import atexit, gc, sys\n"
              "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
              "sys.argv = ['parroles', *sys.argv[1:]]\n"
              "from parroles.__main__ import main\n"
              "main()\n")
    argv = [arg.format(ledger=tmp_path / "l.duckdb") for arg in args]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == code, done.stderr
    assert done.stdout.rstrip().endswith("frozen at exit: True")


# -- real processes: signals and the live view --------------------------------------------------


def _spec_for_waiting(project: Path) -> Path:
    return write_spec(project, """
        [batch]
        max_concurrent = 2
        cancel_grace = 1
        [[roles]]
        name = "a"
        call = "myroles:wait_for_cancel"
        [[roles]]
        name = "b"
        command = ["sleep", "300"]
        [[roles]]
        name = "queued"
        call = "myroles:ok"
    """)


def test_sigint_to_parroles_run_exits_130_with_cancelled_runs(project):
    ledger = project / "l.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
                             "from parroles.cli import main; main()", "run", str(_spec_for_waiting(project)),
                             "--ledger", str(ledger)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: runs_with_status(ledger, "RUNNING") == 2, what="two runs RUNNING")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    with Ledger(ledger) as opened:
        runs = opened.list_runs()
    assert [r.status for r in runs] == [RunStatus.CANCELLED] * 3
    assert {r.reason for r in runs} == {Reason.INTERRUPTED}


def test_the_live_view_on_a_terminal(project):
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(write_spec(project, GOOD_SPEC)),
                             "--ledger", str(project / "l.duckdb")], stdout=secondary, stderr=secondary,
                            env=os.environ | {"COLUMNS": "100", "TERM": "xterm"})
    os.close(secondary)
    screen = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(primary)
    assert proc.wait(timeout=WAIT) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
    assert "3/3 done" in text
    assert "elapsed" in text and "COMPLETED" in text
    # The live table is erased when the batch ends, and the summary is printed once after it.
    raw = screen.decode(errors="replace")
    last_frame, summary = raw.rindex("done"), raw.index("duration")
    assert last_frame < summary and "\x1b[2K" in raw[last_frame:summary]
    assert text.count("duration") == 1


def test_trace_to_an_unwritable_place_is_a_usage_error(filled, tmp_path):
    ledger, batch_id = filled
    result = CliRunner().invoke(cli, ["trace", batch_id, "--ledger", str(ledger), "-o", str(tmp_path / "no" / "t.json")])
    assert result.exit_code == 2
    assert result.output.startswith("parroles: error: cannot write") and result.output.count("\n") == 1
