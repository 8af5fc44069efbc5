"""A file that is not a ledger is refused as such and left byte-identical; DuckDB never loads an extension for it."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner

from parroles import Ledger
from parroles.cli import cli
from parroles.ledger import db as ledger_db
from parroles.ledger import query as safe_sql
from parroles.ledger.export import export_tables

SPEC = """
[[roles]]
name = "only"
command = ["python", "-c", "pass"]
"""
SETTINGS = "SELECT current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
OFF = (False, False)


def _sqlite_database(path: Path) -> None:
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE runs (run_id TEXT, status TEXT)")
        con.execute("INSERT INTO runs VALUES ('r1', 'COMPLETED')")
    con.close()


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


@pytest.mark.parametrize("make", [_sqlite_database, _random_bytes], ids=["sqlite", "random-bytes"])
@pytest.mark.parametrize("command", [["run", "{spec}"], ["runs"], ["sql", "SELECT 1"]], ids=["run", "runs", "sql"])
def test_a_foreign_file_is_not_a_ledger_and_stays_byte_identical(tmp_path, make, command):
    foreign = tmp_path / "data" / "foreign.db"
    foreign.parent.mkdir()
    make(foreign)
    before = hashlib.sha256(foreign.read_bytes()).hexdigest()
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    result = CliRunner().invoke(cli, [*(arg.format(spec=spec) for arg in command), "--ledger", str(foreign)])
    assert result.exit_code == 3, result.output
    assert result.output == f"parroles: error: {foreign} is not a parroles ledger (not a DuckDB database file)\n"
    assert "extension" not in result.output.lower()
    assert hashlib.sha256(foreign.read_bytes()).hexdigest() == before
    assert [p.name for p in foreign.parent.iterdir()] == ["foreign.db"]


@pytest.mark.parametrize("command", [["run", "{spec}"], ["runs"], ["sql", "SELECT 1"], ["export", "{out}"],
                                     ["batches"]], ids=["run", "runs", "sql", "export", "batches"])
def test_a_duckdb_file_of_someone_elses_is_not_a_ledger_and_stays_byte_identical(tmp_path, command):
    """Found by breaking issue 20: run wrote parroles' tables into it, export and sql read it."""
    import duckdb

    theirs = tmp_path / "data" / "theirs.duckdb"
    theirs.parent.mkdir()
    with duckdb.connect(str(theirs)) as con:
        con.execute("CREATE TABLE foo AS SELECT 42 AS answer")
    before = hashlib.sha256(theirs.read_bytes()).hexdigest()
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    args = [arg.format(spec=spec, out=tmp_path / "out") for arg in command]
    result = CliRunner().invoke(cli, [*args, "--ledger", str(theirs)])
    assert result.exit_code == 3, result.output
    assert result.output.startswith(f"parroles: error: {theirs} is a DuckDB file but not a parroles ledger")
    assert result.output.count("\n") == 1
    assert hashlib.sha256(theirs.read_bytes()).hexdigest() == before
    assert [p.name for p in theirs.parent.iterdir()] == ["theirs.duckdb"] and not (tmp_path / "out").exists()


def _settings_of(con: Any) -> tuple[bool, bool]:
    found: tuple[bool, bool] = con.execute(SETTINGS).fetchone()
    return found


def test_every_connection_turns_extension_autoinstall_and_autoload_off(ledger_path, tmp_path, monkeypatch):
    """Each way parroles opens DuckDB, checked on the connection that way gives; and every instance it creates."""
    created: list[tuple[bool, bool]] = []
    real_connect: Callable[..., Any] = duckdb.connect

    def recording_connect(*args: Any, **kwargs: Any) -> Any:
        con = real_connect(*args, **kwargs)
        created.append(_settings_of(con))
        return con

    monkeypatch.setattr(duckdb, "connect", recording_connect)
    monkeypatch.setattr(ledger_db, "_attachments", ledger_db._Attachments())  # a fresh shared instance, created here
    with Ledger(ledger_path) as ledger:  # the writer's leases
        assert ledger.writer.run(_settings_of) == OFF
        assert ledger.query(SETTINGS) == [OFF]
    with Ledger(ledger_path, read_only=True) as reader:  # a reader's attachment
        assert reader.query(SETTINGS) == [OFF]
    for read_only in (True, False):
        with ledger_db.connect(str(ledger_path), read_only=read_only) as con:
            assert _settings_of(con) == OFF
    with ledger_db.connect(str(ledger_path), read_only=True, config={"threads": 1}) as con:  # an instance of its own
        assert _settings_of(con) == OFF
    answer = CliRunner().invoke(cli, ["sql", SETTINGS, "--ledger", str(ledger_path), "--format", "csv"])
    assert answer.exit_code == 0, answer.output
    assert answer.output.splitlines()[1:] == ["False,False"]
    export_tables(str(ledger_path), tmp_path / "exported", "csv")
    assert safe_sql.SAFE_CONFIG["autoload_known_extensions"] is False
    assert created and all(settings == OFF for settings in created), created
