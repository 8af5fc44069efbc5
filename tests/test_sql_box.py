"""``parroles sql``: a refused query touches nothing, journals included; an answer of any size in bounded memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SPEC_DIGEST
from waiting import WAIT

from parroles import Ledger
from parroles.cli import cli
from parroles.ledger.journal import encode, journal_paths
from parroles.ledger.pending import NewRuns, Pending

ORPHAN_BATCH = "orphaned-batch"


def _orphaned_journal(ledger_path: Path, runs: int = 3) -> Path:
    """A journal of a batch of ``runs`` completed runs, left by a writer process that died (its lock went with it)."""
    now = time.time()
    ids = [str(uuid.uuid4()) for _ in range(runs)]
    pending = Pending()
    pending.batches[ORPHAN_BATCH] = {
        "batch_id": ORPHAN_BATCH, "name": None, "spec_digest": SPEC_DIGEST, "config": "{}", "state": "RUNNING",
        "started_at": now, "n_roles": runs, "owner_host": "elsewhere", "owner_pid": 1, "owner_started": 0.0}
    pending.add_runs(NewRuns(ids, list(range(runs)), ["r"] * runs, ORPHAN_BATCH, SPEC_DIGEST, None, now))
    for run_id in ids:
        pending.run_updates[run_id] = {"status": "COMPLETED", "finished_at": now, "output": '"ok"',
                                       "total_events": 0, "success": True}
    writer = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        from parroles.ledger.journal import Journal
        journal = Journal({str(ledger_path)!r})
        assert journal.append(sys.stdin.buffer.read())
        print(journal.path, flush=True)
        os._exit(0)  # no close: as a killed writer leaves it
    """)], input=encode(pending), capture_output=True, timeout=WAIT, check=True)
    return Path(writer.stdout.decode().strip())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ledger_with_orphaned_journal(ledger_path: Path) -> tuple[Path, Path]:
    with Ledger(ledger_path):
        pass
    return ledger_path, _orphaned_journal(ledger_path)


# Refused when DuckDB binds the query (read_text), or only when it runs it (duckdb_extensions() looks for
# its extension folder as it is scanned; a cast fails on the value): none may apply a journal first.
@pytest.mark.parametrize("query", ["SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM duckdb_extensions()",
                                   "SELECT 'not a number'::INTEGER"])
def test_a_query_that_fails_applies_no_journal(ledger_with_orphaned_journal, query):
    ledger, journal = ledger_with_orphaned_journal
    before, journal_before = _sha(ledger), _sha(journal)
    listing = sorted(p.name for p in ledger.parent.iterdir())
    result = CliRunner().invoke(cli, ["sql", query, "--ledger", str(ledger)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("parroles: error:")
    assert _sha(ledger) == before
    assert journal_paths(str(ledger)) == [str(journal)] and _sha(journal) == journal_before
    assert sorted(p.name for p in ledger.parent.iterdir()) == listing


def test_a_query_that_runs_shows_what_the_orphaned_journal_held(ledger_with_orphaned_journal):
    ledger, _ = ledger_with_orphaned_journal
    result = CliRunner().invoke(cli, ["sql", f"SELECT count(*) AS n FROM runs WHERE parent_run_id = '{ORPHAN_BATCH}'",
                                      "--ledger", str(ledger), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [{"n": 3}]
    assert journal_paths(str(ledger)) == []


# -- an answer of any size, in bounded memory ------------------------------------------------------------------

ROWS, ROW_BYTES = 6_000, 100_000  # a 600 MB answer
BIG_ANSWER = f"SELECT i, repeat('x', {ROW_BYTES}) AS s FROM range({ROWS}) t(i)"
PEAK_LIMIT_KB = 1024 * 1024  # 1 GB
# Runs ``parroles sql`` and reports its peak RSS (the only child waited for here) and what it printed.
MEASURE = """
import resource, subprocess, sys
proc = subprocess.Popen([sys.executable, "-m", "parroles", "sql", *sys.argv[1:]], stdout=subprocess.PIPE)
printed = lines = 0
while chunk := proc.stdout.read(1 << 20):
    printed += len(chunk)
    lines += chunk.count(b"\\n")
code = proc.wait()
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, printed, lines)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_a_600_mb_answer_is_printed_in_under_1_gb(ledger_path, fmt):
    with Ledger(ledger_path):
        pass
    done = subprocess.run([sys.executable, "-c", MEASURE, BIG_ANSWER, "--ledger", str(ledger_path),
                           "--format", fmt, "--query-timeout", "600"], capture_output=True, text=True, timeout=600)
    code, peak_kb, printed, lines = map(int, done.stdout.split())
    assert code == 0, done.stderr
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MB"
    if fmt == "json":  # every byte of every row, as JSON
        assert printed > ROWS * ROW_BYTES and lines == ROWS * 4 + 2
    else:  # a header (and the table's rule), then a line per row; cells cut to 80 characters, and said so
        assert lines == ROWS + (1 if fmt == "csv" else 3)


def test_memory_running_out_is_one_line_and_exit_2(ledger_path, monkeypatch):
    """Whatever runs out of memory (DuckDB's fetch into Python, or the printing), it is a refusal, not a traceback."""
    with Ledger(ledger_path):
        pass
    from parroles.cli import formats

    def no_memory(*_args: object, **_kwargs: object) -> str:
        raise MemoryError()

    for fmt, name in (("json", "_json_value"), ("csv", "csv_cell"), ("table", "TableCells.cell")):
        with monkeypatch.context() as patched:
            owner, _, attribute = name.rpartition(".")
            patched.setattr(getattr(formats, owner) if owner else formats, attribute, no_memory)
            result = CliRunner().invoke(cli, ["sql", "SELECT 1 AS one", "--ledger", str(ledger_path),
                                              "--format", fmt])
        assert result.exit_code == 2, (fmt, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith("parroles: error:") and result.stderr.count("\n") == 1, result.stderr
        assert "memory" in result.stderr


def test_memory_limit_of_the_process_is_one_line_and_exit_2(ledger_path):
    """Under an address-space limit, a large answer either prints or fails with one line: never a traceback."""
    with Ledger(ledger_path):
        pass
    limit = 2 * 1024**3  # address space: what the whole answer held at once in Python would need, and more
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
        sys.argv = ["parroles", "sql", {BIG_ANSWER!r}, "--ledger", {str(ledger_path)!r}, "--format", "json"]
        from parroles.cli.commands import main
        main()
    """)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=WAIT * 5)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode != 0:
        assert done.returncode == 2 and done.stderr.startswith("parroles: error:"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_answers_over_several_fetches_print_as_one(ledger_path):
    """Printing batch by batch gives what printing the whole answer at once gave, in every format."""
    with Ledger(ledger_path):
        pass
    query = "SELECT i, i / 2 AS half, 'row ' || i AS label, NULL AS nothing FROM range(5000) t(i) ORDER BY i"
    rows = [(i, i * 0.5, f"row {i}", None) for i in range(5000)]
    as_json = CliRunner().invoke(cli, ["sql", query, "--ledger", str(ledger_path), "--format", "json"])
    assert as_json.exit_code == 0
    assert as_json.output == json.dumps([{"i": i, "half": h, "label": label, "nothing": n} for i, h, label, n in rows],
                                        indent=2) + "\n"
    as_csv = CliRunner().invoke(cli, ["sql", query, "--ledger", str(ledger_path), "--format", "csv"])
    assert as_csv.output.splitlines() == ["i,half,label,nothing", *(f"{i},{h:.1f},row {i}," for i, h, _, _ in rows)]
    table = CliRunner().invoke(cli, ["sql", query, "--ledger", str(ledger_path), "--max-rows", "4500"])
    lines = table.output.splitlines()
    assert lines[0].split() == ["i", "half", "label", "nothing"] and len(lines) == 2 + 4500 + 1
    assert lines[-2].split() == ["4499", "2249.5", "row", "4499"]
    assert "only the first 4500 rows" in lines[-1]
    empty = CliRunner().invoke(cli, ["sql", "SELECT 1 AS one WHERE false", "--ledger", str(ledger_path),
                                     "--format", "json"])
    assert empty.output == "[]\n"
