"""scripts/bench.py and scripts/stop_transport.py keep working, at a tiny size. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "scripts" / "bench.py"


def test_bench_runs_every_workload_at_a_tiny_size():
    done = subprocess.run([sys.executable, str(BENCH), "--scale", "0.005", "--reps", "1", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {row["workload"] for row in report["rows"]} == set(_workloads())
    for row in report["rows"]:
        assert isinstance(row["parroles"], (int, float)) and row["target"] is not None
    ordered = [row for row in report["rows"] if row["workload"] == "h" and "in order" in row["measure"]]
    assert ordered[0]["met"] is True  # correctness, not speed: every event stored, in order


def test_stop_transport_measures_every_way():
    script = BENCH.parent / "stop_transport.py"
    done = subprocess.run([sys.executable, str(script), "--reps", "3", "--pause", "0.001"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]
    assert len(rows) == 5 and all(len(row.split()) >= 5 for row in rows), done.stdout


def _workloads() -> list[str]:
    """The bench's own list of workloads (read from it, not copied)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("parroles_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return list(bench.WORKLOADS)
