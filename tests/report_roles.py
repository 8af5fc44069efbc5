"""Role functions for the report's tests (importable by workers by name)."""

from __future__ import annotations

from typing import Any

import parroles

HOSTILE = "<script>window.pwned = 1</script>"  # a role name, an error, a line of output: text, never markup


def prepare(rows: int = 3) -> list[int]:
    print(f"preparing {rows} rows")
    return list(range(rows))


def shout() -> str:
    return "AAA"


def train(lr: float, seed: int, epochs: int = 2) -> dict[str, float]:
    total = sum(parroles.context().inputs["prepare"])
    return {"loss": round(total * lr / (seed * epochs), 6)}


def breaks() -> None:
    print('<img src="x" onerror="window.pwned = 2">')
    print("about to fail")
    raise ValueError(f"<b>bad</b> & worse {HOSTILE}")


def noop(*_: Any) -> None:
    return None


# A matrix role's output, shown in its grid cell's title: quotes end an attribute unless escaped.
ATTRIBUTES = '" onmouseover="window.pwned = 3" style="position:fixed;inset:0;background:red" x="R&D <b> café'


def attributes(x: int, y: int) -> str:
    return ATTRIBUTES
