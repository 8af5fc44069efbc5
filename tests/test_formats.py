"""Issue 21 item 1: what comes out of the ledger is exactly what went in (CSV and JSON), and the table says
when it shortened something."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import duckdb
import pytest
from click.testing import CliRunner

from parroles import Ledger
from parroles.cli import cli

VALUES = ("SELECT 0.123456::DOUBLE AS x, 1e-5::DOUBLE AS tiny, 0.1::DOUBLE + 0.2::DOUBLE AS sum, 1/3 AS third, "
          "repeat('long ', 40) AS text, NULL AS nothing, 123456789012345678901234567890 AS huge, "
          "TIMESTAMPTZ '2026-12-05 10:11:12.345678+00' AS at, "
          """('{"a": [1, 2.5, "x"], "b": "' || repeat('y', 100) || '"}')::JSON AS j, 0.1 AS dec""")


@pytest.fixture
def ledger(ledger_path):
    with Ledger(ledger_path):
        pass
    return ledger_path


def sql(ledger, query, *options):
    result = CliRunner().invoke(cli, ["sql", query, "--ledger", str(ledger), *options])
    assert result.exit_code == 0, result.output
    return result.output


def duckdb_row(query):
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(query).fetchone()


def test_csv_carries_every_value_exactly(ledger):
    (header, row) = list(csv.reader(io.StringIO(sql(ledger, VALUES, "--format", "csv"))))
    exact = duckdb_row(VALUES)
    cells = dict(zip(header, row, strict=True))
    assert float(cells["x"]) == exact[0] and float(cells["tiny"]) == exact[1] and float(cells["sum"]) == 0.1 + 0.2
    assert float(cells["third"]) == 1 / 3
    assert cells["text"] == "long " * 40 and cells["nothing"] == ""
    assert int(cells["huge"]) == exact[6]
    assert dt.datetime.fromisoformat(cells["at"]) == exact[7] and cells["at"].endswith(".345678+00:00")
    assert json.loads(cells["j"]) == {"a": [1, 2.5, "x"], "b": "y" * 100} and cells["dec"] == "0.1"


def test_json_carries_every_value_exactly_and_json_columns_as_json(ledger):
    (row,) = json.loads(sql(ledger, VALUES, "--format", "json"))
    exact = duckdb_row(VALUES)
    assert row["x"] == exact[0] and row["tiny"] == exact[1] and row["third"] == 1 / 3 and row["sum"] == 0.1 + 0.2
    assert row["text"] == "long " * 40 and row["nothing"] is None and row["huge"] == exact[6]
    assert dt.datetime.fromisoformat(row["at"]) == exact[7]
    assert row["j"] == {"a": [1, 2.5, "x"], "b": "y" * 100} and row["dec"] == 0.1


def test_the_table_keeps_real_figures_and_says_when_it_shortened(ledger):
    shown = sql(ledger, "SELECT 0.123456::DOUBLE AS x, 1e-5::DOUBLE AS tiny")
    assert "0.123456" in shown and "1e-05" in shown and "shortened" not in shown
    shown = sql(ledger, "SELECT 1/3 AS third, repeat('z', 200) AS text")
    assert "0.333333" in shown and "z" * 77 + "..." in shown
    assert shown.rstrip().endswith("(values shortened; the machine formats, --json or --format csv|json, are exact)")


def test_every_commands_json_has_microseconds_and_offsets(run_batch, ledger_path):
    _, batch_id = run_batch(["a"], lambda role, run_id: role)
    runs = json.loads(CliRunner().invoke(cli, ["runs", "--ledger", str(ledger_path), "--json"]).output)
    queued = runs[0]["queued_at"]
    assert dt.datetime.fromisoformat(queued).tzinfo is not None and len(queued.split(".")[1]) >= 6


def test_a_json_number_no_float_can_hold_is_kept_as_written(ledger):
    """Found by breaking issue 20: '[1e400]'::JSON crashed --format json with a traceback."""
    (row,) = json.loads(sql(ledger, "SELECT '[1e400, 0.1, 12345678901234567890]'::JSON AS j", "--format", "json"))
    assert row["j"] == ["1E+400", 0.1, 12345678901234567890]


def test_json_keeps_line_separators_whole_and_columns_named_alike(ledger):
    """Found by breaking issue 21: U+2028 got two spaces after it; a second column 'a' replaced the first."""
    (row,) = json.loads(sql(ledger, "SELECT chr(8232) || 'x' AS a, chr(133) || 'y' AS a, 3 AS a", "--format", "json"))
    assert row == {"a": "\u2028x", "a#2": "\x85y", "a#3": 3}


def test_a_table_cell_with_a_line_break_stays_on_its_line(ledger):
    shown = sql(ledger, "SELECT 'one' || chr(10) || 'two' AS t")
    assert "one\\ntwo" in shown and shown.rstrip().endswith("(values shortened; the machine formats, --json or --format csv|json, are exact)")
