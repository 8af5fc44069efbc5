"""How the command line shows things: tables, JSON, and the live view of a running batch."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import enum
import io
import json
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import click

from parroles.records import RoleRunResult, RunStatus, RunUpdate


def to_plain(value: Any) -> Any:
    """Records, enums and datetimes as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return to_plain(value.to_dict())
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def echo_json(value: Any) -> None:
    click.echo(json.dumps(to_plain(value), indent=2, default=str))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows([[_cell(v) for v in row] for row in rows])
    return out.getvalue().rstrip("\n")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value.value if isinstance(value, enum.Enum) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def seconds(ms: float | None) -> str:
    return "" if ms is None else f"{ms / 1000:.2f} s"


def summary_rows(results: Sequence[RoleRunResult]) -> list[list[Any]]:
    return [[r.role, r.status, seconds(r.duration_ms), r.attempt, r.error.one_line() if r.error else ""]
            for r in results]


class ProgressView:
    """Shows a batch while it runs: a live table on a terminal, a line per finished role otherwise."""

    def __init__(self, roles: Sequence[str], *, quiet: bool) -> None:
        self.roles = list(roles)
        self.status = [RunStatus.QUEUED] * len(roles)
        self.started: list[float | None] = [None] * len(roles)
        self.ended: list[float | None] = [None] * len(roles)
        self.quiet = quiet
        self.live_mode = not quiet and sys.stdout.isatty()
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> ProgressView:
        if self.live_mode:
            from rich.live import Live

            self._live = Live(self, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)

    def update(self, update: RunUpdate) -> None:
        now = time.monotonic()
        with self._lock:
            self.status[update.position] = update.status
            if update.status is RunStatus.RUNNING:
                self.started[update.position] = now
            elif update.status.terminal:
                self.ended[update.position] = now
        if not self.live_mode and not self.quiet and update.result is not None:
            result = update.result
            error = f"  {result.error.one_line()}" if result.error else ""
            click.echo(f"{result.status.value:<9} {update.role}  {seconds(result.duration_ms)}{error}")

    def __rich__(self) -> Any:
        from rich.table import Table

        now = time.monotonic()
        grid = Table(box=None, show_header=True, header_style="bold")
        for column in ("role", "status", "elapsed"):
            grid.add_column(column)
        with self._lock:
            for role, status, start, end in zip(self.roles, self.status, self.started, self.ended):
                elapsed = "" if start is None else f"{(end or now) - start:.1f} s"
                grid.add_row(role, _styled(status), elapsed)
            done = sum(s.terminal for s in self.status)
        grid.caption = f"{done}/{len(self.roles)} done"
        return grid


def _styled(status: RunStatus) -> str:
    colour = {RunStatus.COMPLETED: "green", RunStatus.FAILED: "red", RunStatus.CANCELLED: "yellow",
              RunStatus.RUNNING: "cyan"}.get(status, "dim")
    return f"[{colour}]{status.value}[/{colour}]"
