"""The public surface: every name users need, ``parroles.run`` and its ``BatchResult``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import roles_for_tests as R

import parroles
from parroles import BatchResult, ConfigError, Ledger, RunStatus


def test_every_public_name_imports():
    assert parroles.__all__ == sorted(parroles.__all__)
    for name in parroles.__all__:
        assert getattr(parroles, name) is not None, name
    for needed in ("run", "BatchResult", "BatchState", "BackendUnavailable", "UnsafeQueryError"):
        assert needed in parroles.__all__
    for internal in ("to_json", "output_from_json", "validate_digest"):
        assert internal not in parroles.__all__


def test_all_the_lazy_map_and_the_type_checking_imports_agree():
    """Issue 22: one list of exported names, checked both ways against what type checkers are shown."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(parroles.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    shown = {alias.name: node.module for node in guarded.body if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    assert shown == parroles._EXPORTS
    assert parroles.__all__ == sorted(parroles._EXPORTS)


def test_every_error_class_is_exported_so_every_recorded_type_imports():
    import inspect

    import parroles.errors as errors

    classes = {name for name, value in vars(errors).items()
               if inspect.isclass(value) and issubclass(value, (Exception, Warning)) and value.__module__ == errors.__name__}
    assert classes <= set(parroles.__all__), classes - set(parroles.__all__)


def test_import_parroles_pays_for_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", "import sys, parroles; parroles.ParallelRoleConfig; "
                           "print(sorted(m for m in ('duckdb', 'pyarrow', 'loky') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_run_returns_a_batch_result_and_never_raises_for_failed_roles(ledger_path):
    batch = parroles.run(["a", "fail-b", "c"], R.fail_if_named_fail, ledger=ledger_path, max_concurrent=2)
    assert isinstance(batch, BatchResult) and len(batch) == 3
    assert [r.role for r in batch] == ["a", "fail-b", "c"]
    assert not batch.ok and batch.by_role["fail-b"].status is RunStatus.FAILED
    assert batch.batch_id.startswith("fail_if_named_fail-")
    with Ledger(ledger_path) as ledger:
        assert [r.run_id for r in ledger.list_runs(batch.batch_id)] == [r.run_id for r in batch]
        assert ledger.get_batch(batch.batch_id).name == "fail_if_named_fail"
    everything_failed = parroles.run(["fail-x"], R.fail_if_named_fail, ledger=ledger_path)
    assert not everything_failed.ok and everything_failed[0].status is RunStatus.FAILED


def test_run_uses_the_default_ledger_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PARROLES_LEDGER", raising=False)
    batch = parroles.run(["a"], R.echo, name="nightly", batch_id=None)
    assert batch.ok and batch.batch_id.startswith("nightly-")
    with Ledger(tmp_path / ".parroles" / "ledger.duckdb") as ledger:
        (run,) = ledger.list_runs(batch.batch_id)
        assert len(run.spec_digest) == 64
    monkeypatch.setenv("PARROLES_LEDGER", str(tmp_path / "elsewhere.duckdb"))
    assert parroles.run(["a"], R.echo).ok
    assert (tmp_path / "elsewhere.duckdb").exists()


def test_run_takes_config_fields_as_keywords(ledger_path):
    base = parroles.ParallelRoleConfig(max_concurrent=1)
    batch = parroles.run(["a", "b"], R.echo, ledger=ledger_path, config=base, fail_fast=True)
    with Ledger(ledger_path) as ledger:
        config = ledger.get_batch(batch.batch_id).config
    assert config["max_concurrent"] == 1 and config["fail_fast"] is True
    with pytest.raises(ConfigError, match="not a ParallelRoleConfig field"):
        parroles.run(["a"], R.echo, ledger=ledger_path, max_concurrency=2)


def test_the_layout_keeps_its_promises():
    """At most twelve top-level modules, no module over 400 lines (issue 13)."""
    root = importlib.util.find_spec("parroles").submodule_search_locations[0]
    from pathlib import Path

    top = [p for p in Path(root).glob("*.py")]
    assert len(top) <= 12, sorted(p.name for p in top)
    import ast

    for module in Path(root).rglob("*.py"):
        text = module.read_text()
        assert len(text.splitlines()) <= 400, module
        for node in ast.walk(ast.parse(text)):  # issue 22: no function over 60 lines, its docstring aside
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                assert node.end_lineno - body[0].lineno < 60, f"{module}: {node.name}"


def test_the_runs_column_registry_is_the_table_the_migrations_make(ledger_path):
    """Issue 22 item 4: RUN_COLUMNS (read by the writer's Arrow types, the CLI's views, export) is the table."""
    from parroles.ledger.schema import RUN_COLUMNS, TABLES

    with Ledger(ledger_path) as ledger:
        columns = [name for (name,) in ledger.query(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs' ORDER BY column_index")]
        tables = {name for (name,) in ledger.query("SELECT table_name FROM duckdb_tables()")}
    assert columns == [name for name, _ in RUN_COLUMNS]
    assert tables == set(TABLES)
