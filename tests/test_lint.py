"""The tools that keep the code honest run as tests too (and as ``tox -e lint``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "ruff", "check", "parroles", "tests", "scripts"],
    [sys.executable, "-m", "mypy"],
    [shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"],
], ids=["ruff", "mypy-strict", "import-linter"])
def test_lint(command):
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
