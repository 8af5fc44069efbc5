"""The README's promises: its Python example runs as pasted, its quick start matches CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_the_python_example_runs_when_pasted_into_a_file(tmp_path):
    (example,) = re.findall(r"```python\n(.*?)```", README, re.S)
    script = tmp_path / "example.py"
    script.write_text(example)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("planner COMPLETED")
    assert lines[2].startswith("my-own-role COMPLETED")
    assert re.fullmatch(r"ok: True token: [0-9a-f]{64}", lines[3])
    assert lines[4:] == [f"{i} step {{'role': 'planner', 'step': {i - 1}}}" for i in range(1, 6)]


def test_ci_runs_the_readme_test_command():
    (block,) = re.findall(r"## Quick start.*?```sh\n(.*?)```", README, re.S)
    install_and_run, test_command = block.strip().splitlines()
    assert "parroles run examples/quickstart.toml" in install_and_run
    assert test_command in (ROOT / ".ci" / "run").read_text()
