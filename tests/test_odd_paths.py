"""Ledger paths with characters that mean something to DuckDB or to a glob (``?``, ``*``, ``[``) work in every command."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from parroles import Ledger, LedgerError
from parroles.cli import cli

ROLES = """
import parroles

def ok():
    parroles.context().emit("note", {"n": 1})
    print("said by the role")
    return "ok"
"""
SPEC = """
[batch]
name = "odd"

[[roles]]
name = "first"
call = "oddroles:ok"

[[roles]]
name = "second"
call = "oddroles:ok"
needs = ["first"]
"""


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (args, result.output)
    return result.output


def _spec(tmp_path: Path) -> Path:
    (tmp_path / "oddroles.py").write_text(ROLES)
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    return spec


def _run(spec: Path, ledger: Path) -> str:
    ran = json.loads(_invoke("run", str(spec), "--ledger", str(ledger), "--json"))
    assert [r["status"] for r in ran["results"]] == ["COMPLETED", "COMPLETED"]
    return str(ran["batch_id"])


def _every_read_command(ledger: Path, batch_id: str, out: Path) -> None:
    runs = json.loads(_invoke("runs", "--ledger", str(ledger), "--json"))
    assert len(runs) == 2
    run_id = runs[0]["run_id"]
    assert batch_id in _invoke("batches", "--ledger", str(ledger))
    assert run_id in _invoke("show", run_id, "--ledger", str(ledger))
    assert _invoke("logs", run_id, "--ledger", str(ledger)) == "| said by the role\n"
    answer = _invoke("sql", "SELECT count(*) AS n FROM events WHERE kind = 'note'", "--ledger", str(ledger),
                     "--format", "json")
    assert json.loads(answer) == [{"n": 2}]
    _invoke("export", str(out / "exported"), "--ledger", str(ledger), "--format", "csv")
    assert (out / "exported" / "runs.csv").read_text().count("COMPLETED") == 2
    _invoke("trace", batch_id, "--ledger", str(ledger), "-o", str(out / "trace.json"))
    with Ledger(ledger, read_only=True) as opened:
        assert len(opened.list_runs(batch_id)) == 2


@pytest.mark.parametrize(("folder", "name"), [
    ("plain", "what?.duckdb"),
    ("star*folder", "star*.duckdb"),
    ("bracket[folder", "bracket[.duckdb"),
    ("all*[]", "all?*[]x.duckdb"),
])
def test_every_command_works_on_a_ledger_whose_path_holds_them(tmp_path, folder, name):
    ledger = tmp_path / folder / name
    ledger.parent.mkdir()
    batch_id = _run(_spec(tmp_path), ledger)
    _every_read_command(ledger, batch_id, ledger.parent)
    with Ledger(ledger) as opened:  # the Python API, for writing
        assert len(opened.list_runs(batch_id)) == 2
    # Nothing left beside the ledger but what the commands were asked to write.
    assert sorted(p.name for p in ledger.parent.iterdir()) == sorted([name, "exported", "trace.json"])


@pytest.mark.parametrize("folder", ["which?folder", "all?*[", "a?b/c"])
def test_a_ledger_in_a_folder_holding_a_question_mark_is_read_and_refused_for_writing(tmp_path, folder):
    """DuckDB would write its log into a folder of another name: writing is refused up front, reading works."""
    spec = _spec(tmp_path)
    ledger = tmp_path / folder / "runs.duckdb"
    ledger.parent.mkdir(parents=True)
    result = CliRunner().invoke(cli, ["run", str(spec), "--ledger", str(ledger)])
    assert result.exit_code == 3, result.output
    assert result.output.count("\n") == 1 and "write-ahead log" in result.output
    assert list(ledger.parent.iterdir()) == []
    with pytest.raises(LedgerError, match="folder whose path has no '\\?'"):
        Ledger(ledger)
    staging = tmp_path / "staging" / "runs.duckdb"  # a ledger written elsewhere, then moved there
    batch_id = _run(spec, staging)
    staging.rename(ledger)
    before = ledger.read_bytes()
    _every_read_command(ledger, batch_id, tmp_path)
    assert ledger.read_bytes() == before and [p.name for p in ledger.parent.iterdir()] == ["runs.duckdb"]
