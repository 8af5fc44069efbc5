"""Pipelines as users meet them: spec files with needs and matrix, `parroles graph`, `show`'s inputs, trace flows,
the quickstart pipeline, the live view, and the same pipeline on Dask. Terminal behaviour runs in real processes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import conftest
import pytest

import parroles
from parroles import ConfigError, Ledger, ParallelRoleConfig, Reason, Role, RunStatus, execute_roles_parallel
from parroles.roles import Review, TestReport

WAIT = 60.0
ROOT = Path(__file__).parent.parent
ROLES = """
import os, time
import parroles

def echo(**params):
    ctx = parroles.context()
    return {"params": params, "inputs": sorted(ctx.inputs),
            "digests": {name: token.output_digest for name, token in sorted(ctx.handoffs.items())}}

def boom():
    raise ValueError("planned failure")

def wait_for_file(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"
"""
PIPELINE = """
    [batch]
    name = "pipe"
    max_concurrent = 2

    [[roles]]
    name = "planner"
    call = "piperoles:echo"

    [[roles]]
    name = "train"
    call = "piperoles:echo"
    params = { epochs = 3 }
    matrix = { lr = [0.1, 0.01], seed = [1, 2] }
    needs = ["planner"]

    [[roles]]
    name = "report"
    call = "piperoles:echo"
    needs = ["train"]
"""
TRAINS = ["train[lr=0.1,seed=1]", "train[lr=0.1,seed=2]", "train[lr=0.01,seed=1]", "train[lr=0.01,seed=2]"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "piperoles.py").write_text(ROLES)
    return tmp_path


def write_spec(folder: Path, text: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parroles", *args], capture_output=True, text=True, timeout=WAIT,
                          **kwargs)


def run_json(spec: Path, ledger: Path, *extra: str) -> dict[str, Any]:
    done = cli("run", str(spec), "--ledger", str(ledger), "--json", *extra)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


@pytest.fixture
def piped(project: Path) -> tuple[Path, dict[str, Any]]:
    """The needs-and-matrix spec, run once: (its ledger, the --json summary)."""
    ledger = project / "l.duckdb"
    return ledger, run_json(write_spec(project, PIPELINE), ledger)


# -- spec files: needs and matrix through `parroles run --json` ---------------------------------------


def test_a_spec_with_needs_and_a_matrix_runs_in_dependency_order(piped):
    ledger, summary = piped
    results = summary["results"]
    assert [r["role"] for r in results] == ["planner", *TRAINS, "report"]
    assert all(r["status"] == "COMPLETED" for r in results)
    by_role = {r["role"]: r["output"] for r in results}
    assert by_role["planner"] == {"params": {}, "inputs": [], "digests": {}}
    for name, (lr, seed) in zip(TRAINS, [(0.1, 1), (0.1, 2), (0.01, 1), (0.01, 2)], strict=True):
        assert by_role[name]["params"] == {"epochs": 3, "lr": lr, "seed": seed}  # its params plus its matrix
        assert by_role[name]["inputs"] == ["planner"]
    assert by_role["report"]["inputs"] == sorted(TRAINS)  # a need naming a matrix role: every expansion
    with Ledger(ledger) as opened:
        runs = {str(r.role): r for r in opened.list_runs(summary["batch_id"])}
    assert by_role["report"]["digests"] == {name: runs[name].output_digest for name in sorted(TRAINS)}
    for name in TRAINS:  # order of starts against finishes, from the ledger's worker-side times
        assert runs[name].started_at >= runs["planner"].finished_at
        assert runs["report"].started_at >= runs[name].finished_at


def test_a_need_may_name_one_expansion_and_strict_handoffs_lets_custom_names_be(project):
    spec = write_spec(project, """
        [batch]
        strict_handoffs = true
        [[roles]]
        name = "train"
        call = "piperoles:echo"
        matrix = { seed = [1, 2] }
        [[roles]]
        name = "pick"
        call = "piperoles:echo"
        needs = ["train[seed=2]"]
    """)
    results = run_json(spec, project / "l.duckdb")["results"]
    assert [r["role"] for r in results] == ["train[seed=1]", "train[seed=2]", "pick"]
    assert results[2]["output"]["inputs"] == ["train[seed=2]"]


def test_a_failed_need_cancels_its_dependents_upstream_and_plain_output_says_why(project):
    spec = write_spec(project, """
        [[roles]]
        name = "planner"
        call = "piperoles:boom"
        [[roles]]
        name = "coder"
        call = "piperoles:echo"
        needs = ["planner"]
        [[roles]]
        name = "aside"
        call = "piperoles:echo"
    """)
    done = cli("run", str(spec), "--ledger", str(project / "l.duckdb"))
    assert done.returncode == 1, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("CANCELLED")]
    assert line.split()[:3] == ["CANCELLED", "coder", "upstream:"] and "planner" in line
    assert any(line.startswith("COMPLETED aside") for line in done.stdout.splitlines())
    assert "waiting for" not in done.stdout  # plain output says nothing of waits


def test_a_spec_fan_in_runs_over_what_succeeded_with_on_failed_needs_run(project):
    spec = write_spec(project, """
        [[roles]]
        name = "planner"
        call = "piperoles:boom"
        [[roles]]
        name = "aside"
        call = "piperoles:echo"
        [[roles]]
        name = "report"
        call = "piperoles:echo"
        needs = ["planner", "aside"]
        on_failed_needs = "run"
    """)
    done = cli("run", str(spec), "--ledger", str(project / "l.duckdb"), "--json")
    assert done.returncode == 1, done.stderr
    by_role = {r["role"]: r for r in json.loads(done.stdout)["results"]}
    assert by_role["report"]["status"] == "COMPLETED" and by_role["report"]["output"]["inputs"] == ["aside"]


BAD_SPECS = {
    "unknown need": ('[[roles]]\nname = "a"\ncall = "piperoles:echo"\nneeds = ["ghost"]\n',
                     "role 'a' needs 'ghost', which is no role of the spec"),
    "needs not a list": ('[[roles]]\nname = "a"\ncall = "piperoles:echo"\nneeds = "b"\n',
                         "role 'a': needs must be a list of role names"),
    "needs itself": ('[[roles]]\nname = "a"\ncall = "piperoles:echo"\nneeds = ["a"]\n', "role 'a' needs itself"),
    "cycle": ('[[roles]]\nname = "a"\ncall = "piperoles:echo"\nneeds = ["c"]\n'
              '[[roles]]\nname = "b"\ncall = "piperoles:echo"\nneeds = ["a"]\n'
              '[[roles]]\nname = "c"\ncall = "piperoles:echo"\nneeds = ["b"]\n', "a cycle: a -> c -> b -> a"),
    "duplicate after expansion": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = { x = [1, 1] }\n',
                                  "role 't[x=1]': duplicate name after matrix expansion"),
    "expansion equal to a role": ('[[roles]]\nname = "t[x=1]"\ncall = "piperoles:echo"\n'
                                  '[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = { x = [1] }\n',
                                  "role 't[x=1]': duplicate name after matrix expansion"),
    "matrix not a table": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = [1, 2]\n',
                           "role 't': matrix must be a table of non-empty lists"),
    "empty matrix": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = {}\n',
                     "role 't': matrix must be a table of non-empty lists"),
    "empty axis": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = { lr = [] }\n',
                   "role 't': matrix axis 'lr' must be a non-empty list"),
    "axis not a list": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = { lr = 0.1 }\n',
                        "role 't': matrix axis 'lr' must be a non-empty list"),
    "tables as values": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nmatrix = { lr = [{ a = 1 }] }\n',
                         "role 't': matrix axis 'lr' must list strings, numbers or booleans"),
    "axis also a param": ('[[roles]]\nname = "t"\ncall = "piperoles:echo"\nparams = { lr = 1 }\n'
                          'matrix = { lr = [2] }\n', "role 't': 'lr' is both a matrix axis and a param"),
    "matrix on a command": ('[[roles]]\nname = "t"\ncommand = ["true"]\nmatrix = { lr = [2] }\n',
                            "role 't': matrix needs a 'call' role"),
    "strict handoffs": ('[batch]\nstrict_handoffs = true\n[[roles]]\nname = "planner"\ncall = "piperoles:echo"\n'
                        '[[roles]]\nname = "tester"\ncall = "piperoles:echo"\nneeds = ["planner"]\n',
                        "strict_handoffs: tester accepts handoffs from coder and fixer, not from planner"),
    "on_failed_needs misspelt": ('[[roles]]\nname = "a"\ncall = "piperoles:echo"\non_failed_needs = "ignore"\n',
                                 "role 'a': on_failed_needs must be one of 'cancel', 'run', got 'ignore'"),
    "strict_handoffs not a flag": ('[batch]\nstrict_handoffs = "yes"\n[[roles]]\nname = "a"\n'
                                   'call = "piperoles:echo"\n', "[batch]: strict_handoffs"),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_pipelines_are_spec_errors_exit_2_and_create_no_ledger(project, case):
    text, problem = BAD_SPECS[case]
    ledger = project / "never" / "l.duckdb"
    done = cli("run", str(write_spec(project, text)), "--ledger", str(ledger))
    assert done.returncode == 2, done.stderr
    assert "problem(s) in the spec" in done.stderr and problem in done.stderr, done.stderr
    assert not ledger.exists() and not ledger.parent.exists()
    graph = cli("graph", str(project / "spec.toml"))
    assert graph.returncode == 2 and problem in graph.stderr and graph.stdout == ""


def test_every_pipeline_problem_is_reported_at_once(project):
    spec = write_spec(project, """
        [[roles]]
        name = "a"
        call = "piperoles:echo"
        needs = ["b"]
        [[roles]]
        name = "b"
        call = "piperoles:echo"
        needs = ["a"]
        [[roles]]
        name = "c"
        call = "piperoles:nowhere"
        needs = ["ghost"]
        matrix = { x = [] }
    """)
    done = cli("run", str(spec), "--ledger", str(project / "l.duckdb"))
    assert done.returncode == 2
    problems = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4, done.stderr
    for expected in ("has no attribute 'nowhere'", "matrix axis 'x'", "needs 'ghost'", "a cycle: a -> b -> a"):
        assert any(expected in line for line in problems), (expected, done.stderr)


# -- parroles graph -----------------------------------------------------------------------------------


def test_graph_prints_mermaid_by_default(project):
    done = cli("graph", str(write_spec(project, PIPELINE)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "graph TD",
        '    n1["train[lr=0.1,seed=1]"]', '    n2["train[lr=0.1,seed=2]"]',
        '    n3["train[lr=0.01,seed=1]"]', '    n4["train[lr=0.01,seed=2]"]',
        "    planner --> n1", "    planner --> n2", "    planner --> n3", "    planner --> n4",
        "    n1 --> report", "    n2 --> report", "    n3 --> report", "    n4 --> report",
    ]


def test_graph_quotes_what_mermaid_cannot_take_bare_and_lists_lone_roles(project):
    spec = write_spec(project, """
        [[roles]]
        name = 'say "hi" #1'
        call = "piperoles:echo"
        [[roles]]
        name = "end"
        call = "piperoles:echo"
        needs = ['say "hi" #1']
        [[roles]]
        name = "alone"
        call = "piperoles:echo"
        [[roles]]
        name = "n0"
        call = "piperoles:echo"
    """)
    done = cli("graph", str(spec), "--format", "mermaid")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["graph TD", '    n0["say #quot;hi#quot; #35;1"]', '    n1["end"]',
                                        "    alone", '    n3["n0"]', "    n0 --> n1"]


def test_graph_prints_dot(project):
    spec = write_spec(project, """
        [[roles]]
        name = "planner"
        call = "piperoles:echo"
        [[roles]]
        name = 'co"der'
        call = "piperoles:echo"
        needs = ["planner"]
    """)
    done = cli("graph", str(spec), "--format", "dot")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ('digraph pipeline {\n    rankdir=TB;\n    "planner";\n    "co\\"der";\n'
                           '    "planner" -> "co\\"der";\n}\n')


def test_graph_of_the_quickstart_is_the_pipeline():
    done = cli("graph", str(ROOT / "examples" / "quickstart.toml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["    planner --> coder", "    coder --> reviewer", "    coder --> tester",
                                            "    reviewer --> fixer", "    tester --> fixer"]


# -- the ledger's handoffs: show and trace ------------------------------------------------------------


def _run_ids(ledger: Path, batch_id: str) -> dict[str, str]:
    with Ledger(ledger) as opened:
        return {str(r.role): r.run_id for r in opened.list_runs(batch_id)}


def test_show_lists_a_runs_inputs(piped):
    ledger, summary = piped
    ids = _run_ids(ledger, summary["batch_id"])
    with Ledger(ledger) as opened:
        digests = {str(r.role): r.output_digest for r in opened.list_runs(summary["batch_id"])}
    shown = json.loads(cli("show", ids["report"], "--ledger", str(ledger), "--json").stdout)
    assert [i["role"] for i in shown["inputs"]] == TRAINS  # in batch order
    for handed in shown["inputs"]:
        assert handed["from_run_id"] == ids[handed["role"]] and handed["to_run_id"] == ids["report"]
        assert handed["output_digest"] == digests[handed["role"]]
        assert uuid.UUID(handed["token_id"]) and handed["created_at"]
    assert json.loads(cli("show", ids["planner"], "--ledger", str(ledger), "--json").stdout)["inputs"] == []
    text = cli("show", ids["train[lr=0.1,seed=1]"], "--ledger", str(ledger)).stdout
    section = text[text.index("inputs (1):"):].splitlines()[1].split()
    assert section == ["planner", "from", "run", ids["planner"], "digest", digests["planner"]]


def test_trace_draws_each_handoff_as_a_flow_arrow(piped, tmp_path):
    ledger, summary = piped
    out = tmp_path / "trace.json"
    assert cli("trace", summary["batch_id"], "--ledger", str(ledger), "-o", str(out)).returncode == 0
    events = json.loads(out.read_text())["traceEvents"]
    slices = {e["args"]["run_id"]: e for e in events if e["ph"] == "X" and e["pid"] == 1}
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert len(starts) == len(finishes) == 8 and starts.keys() == finishes.keys()  # 4 into train, 4 out of it
    ids = _run_ids(ledger, summary["batch_id"])
    pairs = []
    for flow_id, start in starts.items():
        finish = finishes[flow_id]
        assert finish["bp"] == "e" and start["cat"] == finish["cat"] == "handoff"
        giver = next(s for s in slices.values() if s["tid"] == start["tid"]
                     and s["ts"] <= start["ts"] <= s["ts"] + s["dur"] and s["ts"] + s["dur"] - start["ts"] <= 1)
        receiver = next(s for s in slices.values() if s["tid"] == finish["tid"] and s["ts"] == finish["ts"])
        pairs.append((giver["name"], receiver["name"]))
    assert sorted(pairs) == sorted([("planner", t) for t in TRAINS] + [(t, "report") for t in TRAINS])
    assert sum(f["ts"] == slices[ids["report"]]["ts"] for f in finishes.values()) == 4  # all four at its start


def test_export_writes_the_handoffs_table(piped, tmp_path):
    import duckdb

    ledger, _ = piped
    assert cli("export", str(tmp_path / "out"), "--ledger", str(ledger), "--format", "csv").returncode == 0
    (count,) = duckdb.connect().execute(f"SELECT count(*) FROM read_csv('{tmp_path / 'out' / 'handoffs.csv'}')"
                                        ).fetchone()
    assert count == 8


# -- the examples -------------------------------------------------------------------------------------


def test_the_quickstart_pipeline_ends_with_the_fixers_merged_verdict(tmp_path):
    ledger = tmp_path / "l.duckdb"
    summary = run_json(ROOT / "examples" / "quickstart.toml", ledger)
    results = {r["role"]: r for r in summary["results"]}
    assert list(results) == ["planner", "coder", "reviewer", "tester", "fixer"]
    assert all(r["status"] == "COMPLETED" for r in results.values())
    review = Review(**{k: v for k, v in results["reviewer"]["output"].items() if k != "kind"})
    report = TestReport(**{k: v for k, v in results["tester"]["output"].items() if k != "kind"})
    verdict = parroles.merge_review_and_tests(review, report)
    with Ledger(ledger) as opened:
        (event,) = opened.get_events(results["fixer"]["run_id"])
        runs = {str(r.role): r for r in opened.list_runs(summary["batch_id"])}
    assert event.kind == "verdict" and event.payload["verdict"] == verdict.value == "requires_fix"
    assert results["fixer"]["output"]["kind"] == "fix"
    assert results["fixer"]["output"]["resolved_issues"] == [*review.comments, *report.failed_cases]
    assert results["coder"]["output"]["notes"].endswith("for 4 planned tasks")  # it read the planner's Plan
    assert runs["reviewer"].started_at >= runs["coder"].finished_at
    assert runs["fixer"].started_at >= max(runs["reviewer"].finished_at, runs["tester"].finished_at)


def test_the_sweep_example_reports_on_every_expansion(tmp_path):
    results = run_json(ROOT / "examples" / "sweep.toml", tmp_path / "l.duckdb")["results"]
    names = [f"train[lr={lr},seed={seed}]" for lr in ("0.1", "0.01") for seed in (1, 2)]
    assert [r["role"] for r in results] == [*names, "report"]
    report = results[-1]["output"]
    assert sorted(report["ranked"]) == sorted(names) and report["best"] == report["ranked"][0]
    losses = {r["role"]: r["output"]["loss"] for r in results[:-1]}
    assert report["best_loss"] == min(losses.values())


# -- the live view ------------------------------------------------------------------------------------


def _read_pty(primary: int, proc: subprocess.Popen[bytes], until: str | None = None) -> str:
    """What the terminal showed (ANSI codes stripped), read until ``until`` appears, else until the end."""
    screen, deadline = b"", time.monotonic() + WAIT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the process closed the terminal: all was read
                break
            if not chunk:
                break
            screen += chunk
            if until is not None and until in _plain(screen):
                break
        elif proc.poll() is not None:
            break
    return _plain(screen)


def _plain(screen: bytes) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))


def test_the_live_view_shows_what_a_queued_role_waits_for(project):
    release = project / "release"
    spec = write_spec(project, f"""
        [[roles]]
        name = "planner"
        call = "piperoles:wait_for_file"
        params = {{ path = "{release}" }}
        [[roles]]
        name = "side"
        call = "piperoles:wait_for_file"
        params = {{ path = "{release}" }}
        [[roles]]
        name = "coder"
        call = "piperoles:echo"
        needs = ["planner", "side"]
    """)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "parroles", "run", str(spec), "--ledger", str(project / "l.duckdb")],
                            stdout=secondary, stderr=secondary, env=os.environ | {"COLUMNS": "120", "TERM": "xterm"})
    os.close(secondary)
    try:
        seen = _read_pty(primary, proc, until="waiting for planner, side")
    finally:
        release.write_text("")  # the roles end whatever was seen, so the process always ends
        rest = _read_pty(primary, proc)
        os.close(primary)
        assert proc.wait(timeout=WAIT) == 0, seen + rest
    assert "waiting for planner, side" in seen, seen
    assert "waiting for" not in rest.split("duration")[-1]  # the summary after the live table says nothing of it


# -- the same pipeline on Dask ------------------------------------------------------------------------


def plan_role() -> dict[str, Any]:
    return {"tasks": ["a", "b"]}


def work_role(part: str) -> dict[str, Any]:
    ctx = parroles.context()
    return {"part": part, "tasks": ctx.inputs["plan"]["tasks"], "token": ctx.handoffs["plan"].output_digest}


def merge_role() -> dict[str, Any]:
    inputs = parroles.context().inputs
    return {"merged": sorted(inputs), "parts": [inputs[name]["part"] for name in sorted(inputs)]}


def fail_role() -> None:
    raise ValueError("planned failure")


def _pipeline() -> list[Role]:
    return [Role("plan", plan_role), *Role("work", work_role, needs=["plan"]).expand(part=["x", "y"]),
            Role("merge", merge_role, needs=["work[part=\"x\"]", "work[part=\"y\"]"]),
            Role("broken", fail_role), Role("after-broken", merge_role, needs=["broken"])]


def _run_pipeline(ledger_path: Path, **config: Any) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
    batch_id = f"batch-{uuid.uuid4()}"
    results = execute_roles_parallel(ledger_path, batch_id, _pipeline(), conftest.SPEC_DIGEST,
                                     ParallelRoleConfig(max_concurrent=2, **config))
    with Ledger(ledger_path) as opened:
        edges = opened.query("SELECT f.role, t.role FROM handoffs h JOIN runs f ON f.run_id = h.from_run_id "
                             "JOIN runs t ON t.run_id = h.to_run_id WHERE t.parent_run_id = ? ORDER BY ALL",
                             [batch_id])
    return [(r.role, r.status, r.output, r.reason) for r in results], [tuple(edge) for edge in edges]



def test_a_pipeline_runs_the_same_on_dask_as_on_loky(tmp_path, dask_address):
    on_loky = _run_pipeline(tmp_path / "loky.duckdb")
    on_dask = _run_pipeline(tmp_path / "dask.duckdb", backend="dask", dask_address=dask_address)
    assert on_dask == on_loky
    results, edges = on_dask
    by_role = {role: (status, output, reason) for role, status, output, reason in results}
    token = by_role['work[part="x"]'][1]["token"]
    assert by_role['work[part="x"]'] == (RunStatus.COMPLETED, {"part": "x", "tasks": ["a", "b"], "token": token}, None)
    assert by_role["merge"][1] == {"merged": ['work[part="x"]', 'work[part="y"]'], "parts": ["x", "y"]}
    assert by_role["broken"][0] is RunStatus.FAILED
    assert by_role["after-broken"][0] is RunStatus.CANCELLED and by_role["after-broken"][2] is Reason.UPSTREAM
    assert edges == [("plan", 'work[part="x"]'), ("plan", 'work[part="y"]'), ('work[part="x"]', "merge"),
                     ('work[part="y"]', "merge")]


def test_a_batch_with_nothing_to_run_them_with_is_a_config_error():
    """No role has a fn and no role_executor is given (an empty list, say): a ConfigError, never an assert."""
    with pytest.raises(ConfigError, match="needs roles with a fn, or a role_executor"):
        parroles.run([])
