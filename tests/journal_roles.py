"""Role functions for the journal tests (importable by workers by name).

Gated roles mark that they started, wait for the test's gate file (another
process holds the ledger by then), then emit their events and return.
Paths come from the environment, which loky workers inherit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import parroles

GATE_WAIT = 60.0
EVENTS = 20


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + GATE_WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def gated_events(role: Any, run_id: str) -> int:
    """Mark the start, wait for the gate, emit EVENTS events; a role named 'forever' then never ends."""
    Path(os.environ["PARROLES_TEST_STARTED"]).touch()
    _wait_for(Path(os.environ["PARROLES_TEST_GATE"]))
    ctx = parroles.context()
    for i in range(EVENTS):
        ctx.emit("step", {"i": i, "role": str(role)})
    while str(role) == "forever":
        time.sleep(0.05)
    return EVENTS


def disk_roles(role: Any, run_id: str) -> str:
    """'fill' fills the folder PARROLES_TEST_DISK; 'noisy' emits large events; 'free' frees the disk."""
    folder = Path(os.environ["PARROLES_TEST_DISK"])
    name = str(role)
    if name == "fill":
        with open(folder / "filler", "wb") as filler:
            try:
                while True:
                    filler.write(b"x" * 65536)
                    filler.flush()
            except OSError:
                pass
    elif name == "noisy":
        ctx = parroles.context()
        for i in range(100):
            ctx.emit("big", {"i": i, "blob": "y" * 5000})
    elif name == "free":
        time.sleep(1.0)  # long enough for the writer to try the full disk and fail
        (folder / "filler").unlink()
    Path(os.environ["PARROLES_TEST_DONE"], name).touch()
    return name
