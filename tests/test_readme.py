"""The README's promises: its examples run as written, its tour works on a real ledger, its quick start is CI's.

- Every ```python block of README.md and docs/*.md runs as a script of its own
  (a fragment that is not meant to run is fenced ```text).
- Every line of the README's tour ("## A short tour": its ```sh blocks, with its
  ```python blocks run in between, in the order written) runs after the
  quickstart spec, on one temporary ledger, with ``quickstart-<id>`` and
  ``<run_id>`` replaced by ids from that ledger, and exits with the code it
  documents (``exit N`` in its comment, else 0).
- The quick start's test command is the one CI runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parroles import Ledger

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TIMEOUT = 120  # seconds, for any one process


def blocks(text: str, language: str) -> list[tuple[int, str]]:
    """Each block fenced as ``language``, with the line its fence opens on."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def section(text: str, heading: str) -> str:
    """From ``heading`` (a ``## `` line) to the next ``## `` heading."""
    (found,) = re.findall(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return found


def environment(ledger: Path) -> dict[str, str]:
    """This checkout's parroles (also in workers), and the ledger every command and script uses by default."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return os.environ | {"PARROLES_LEDGER": str(ledger), "PYTHONPATH": path}


PYTHON_BLOCKS = [(path, line, code) for path in [ROOT / "README.md", *DOCS]
                 for line, code in blocks(path.read_text(), "python")]


def test_the_docs_have_python_examples():
    assert any(path.name == "README.md" for path, _, _ in PYTHON_BLOCKS)
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize(("path", "line", "code"), PYTHON_BLOCKS,
                         ids=[f"{path.relative_to(ROOT)}:{line}" for path, line, _ in PYTHON_BLOCKS])
def test_every_python_block_runs_as_a_script(tmp_path, path, line, code):
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment(tmp_path / "ledger.duckdb"),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{path.name}:{line}\n{done.stdout}\n{done.stderr}"


def tour_steps() -> list[tuple[str, str]]:
    """The tour in the order written: ("sh", one command line) and ("python", a whole script)."""
    steps = []
    for match in FENCE.finditer(section(README, "## A short tour")):
        language, body = match.groups()
        if language == "python":
            steps.append(("python", body))
        elif language == "sh":
            steps += [("sh", line) for line in body.splitlines() if line.strip()]
    return steps


def documented_exit_code(line: str) -> int:
    """``exit N`` in the line's comment, else 0."""
    comment = line.partition("  #")[2]
    found = re.search(r"\bexit (\d+)", comment)
    return int(found.group(1)) if found else 0


def test_the_tour_runs_as_written(tmp_path):
    """Each line of the tour after the quickstart, on one ledger: the exit code it documents."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    ledger = tmp_path / "ledger.duckdb"
    env = environment(ledger)

    def parroles(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "parroles", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)

    done = parroles("run", "examples/quickstart.toml", "--quiet")  # the quick start's first command
    assert done.returncode == 0, done.stdout + done.stderr
    with Ledger(ledger, read_only=True) as opened:
        (batch_id,) = [batch.batch_id for batch in opened.list_batches()]
        run_id = opened.list_runs(parent_run_id=batch_id)[-1].run_id  # the fixer: it has inputs
    assert batch_id.startswith("quickstart-") and f"batch {batch_id} in " in done.stdout

    steps = tour_steps()
    commands = {words[1] for kind, line in steps if kind == "sh" for words in [shlex.split(line, comments=True)]}
    assert {"batches", "runs", "show", "sql", "logs", "run", "graph", "export", "trace"} <= commands
    for kind, text in steps:
        if kind == "python":
            (tmp_path / "tour.py").write_text(text)
            done = subprocess.run([sys.executable, "tour.py"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT)
            assert done.returncode == 0, done.stderr
            continue
        line = text.replace("quickstart-<id>", batch_id).replace("<run_id>", run_id)
        assert "<" not in line.partition("  #")[0], f"a placeholder the test does not fill: {line}"
        program, *args = shlex.split(line, comments=True)
        assert program == "parroles", line
        done = parroles(*args)
        assert done.returncode == documented_exit_code(text), f"{line}\n{done.stdout}\n{done.stderr}"
        assert done.stdout or args[0] in ("export", "trace"), line  # every look shows something

    assert (tmp_path / "trace.json").stat().st_size > 0
    assert {p.name for p in (tmp_path / "ledger-dump").iterdir()} >= {"runs.parquet", "events.parquet"}


def test_the_readme_links_every_docs_page():
    for page in DOCS:
        assert f"](docs/{page.name})" in README, page.name


def test_ci_runs_the_readme_test_command():
    (block,) = re.findall(r"## Quick start.*?```sh\n(.*?)```", README, re.S)
    install_and_run, test_command = block.strip().splitlines()
    assert "parroles run examples/quickstart.toml" in install_and_run
    assert test_command == "bash scripts/ensure-chromium.sh && pip install '.[test]' && python -m pytest"
    assert test_command in (ROOT / ".ci" / "run").read_text()
