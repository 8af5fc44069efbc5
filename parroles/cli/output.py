"""How the command line shows things: tables, JSON, and the live view of a running batch."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from parroles.cli import formats
from parroles.cli.formats import table, to_plain
from parroles.ledger.schema import RUN_COLUMNS
from parroles.results import RoleRunResult, RunRecord, RunStatus, RunUpdate
from parroles.runner.history import eta_seconds, parallel_efficiency

if TYPE_CHECKING:
    from parroles.pipeline import Role

DETAIL_LINES = 5  # lines of a failure's message shown below its role (a command's last stderr lines)


def echo_json(value: Any) -> None:
    echo(json.dumps(to_plain(value), indent=2, default=str, allow_nan=False))


_stdout_closed = False


def echo(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    """click.echo that survives a closed stdout (``parroles run ... | head``): the output is dropped,
    the batch goes on and is recorded."""
    global _stdout_closed
    if _stdout_closed and not err:
        return
    try:
        click.echo(text, err=err, nl=nl)
    except BrokenPipeError:
        if err:
            return
        _stdout_closed = True
        # Later writes, and the interpreter's own flush at exit, go nowhere instead of failing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def print_answer(fmt: str, headers: Sequence[str], batches: Iterable[Sequence[Sequence[Any]]],
                 json_columns: frozenset[int] = frozenset()) -> None:
    """``formats.print_answer`` to stdout; once stdout is closed, no more rows are fetched."""
    formats.print_answer(echo, fmt, headers, itertools.takewhile(lambda _: not _stdout_closed, batches),
                         json_columns)


def seconds(ms: float | None) -> str:
    """A duration for a person: 3 significant digits, so a 0.65 ms run is 0.00065 s, not 0.00 s."""
    return "" if ms is None else f"{ms / 1000:.3g} s"


def why(result: RoleRunResult) -> str:
    """Why a run did not complete: its error, or for a run cancelled before it started its reason; or how
    it completed, when not by one run (reused, or after failed attempts)."""
    if result.status is RunStatus.CANCELLED:
        # The reason says it; a role's own RoleCancelled only repeats it.
        said = result.error is None or result.error.type.endswith("RoleCancelled") or not result.error.message
        detail = "" if said else f": {result.error.message.strip().splitlines()[0]}"  # type: ignore[union-attr]
        return f"{result.reason or 'cancelled'}{detail}"
    if result.error is not None:
        return result.error.one_line()
    if result.reused_from is not None:  # what it reused and why: parroles why
        return f"reused from run {result.reused_from[:8]}"
    if result.attempt > 1:  # what its earlier attempts were is in the ledger: parroles runs --role
        return f"after {result.attempt - 1} failed attempt{'s' if result.attempt > 2 else ''}"
    return ""


def detail_lines(result: RoleRunResult) -> list[str]:
    """The last lines of a failure's message after its first (e.g. a command's stderr), indented."""
    if result.error is None:
        return []
    rest = [line for line in result.error.message.strip().splitlines()[1:] if line.strip()]
    return [f"    {line}" for line in rest[-DETAIL_LINES:]]


SUMMARY_HEADERS = ["role", "status", "duration", "attempt", "why"]


def summary_rows(results: Sequence[RoleRunResult]) -> list[list[Any]]:
    return [[r.role, r.status, seconds(r.duration_ms), r.attempt, why(r)] for r in results]


def summary(results: Sequence[RoleRunResult], slots: int | None = None) -> str:
    """The table printed when a batch ends, with each failure's last lines below it, and what it cost."""
    lines = [table(SUMMARY_HEADERS, summary_rows(results))]
    for result in results:
        if details := detail_lines(result):
            lines += [f"{result.role} ({result.status.value}):", *details]
    if slots and (cost := cost_line(results, slots)):
        lines.append(cost)
    return "\n".join(lines)


def cost_line(results: Sequence[RoleRunResult], slots: int) -> str | None:
    """The batch's CPU time and its parallel efficiency: CPU time / (wall time the roles ran in x slots)."""
    spans = [(r.started_at, r.started_at + r.duration_ms / 1000, r.cost.cpu_ms) for r in results
             if r.cost is not None and r.cost.cpu_ms is not None and r.started_at is not None
             and r.duration_ms is not None]
    if not spans:
        return None
    cpu_ms = sum(cpu or 0.0 for _, _, cpu in spans)
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    share = parallel_efficiency(cpu_ms, wall, slots)
    efficiency = f", parallel efficiency {share:.0%}" if share is not None else ""
    return f"cpu {seconds(cpu_ms)} in {wall:.3g} s of wall on {slots} worker{'s' * (slots > 1)}{efficiency}"


def run_view(record: RunRecord) -> dict[str, Any]:
    """One run as ``runs --json`` and ``show`` give it: keyed by the ``runs`` table's own column names."""
    summary, metadata, cost = record.summary, record.metadata, record.cost
    view = {
        "run_id": record.run_id, "parent_run_id": record.parent_run_id, "position": record.position,
        "role": str(record.role), "status": record.status.value, "spec_digest": record.spec_digest,
        "agent_name": metadata.get("agent_name"), "git_sha": metadata.get("git_sha"), "tags": metadata.get("tags"),
        "queued_at": record.queued_at, "started_at": record.started_at, "finished_at": record.finished_at,
        "duration_ms": summary.duration_ms, "total_events": summary.total_events, "success": summary.success,
        "final_state_digest": summary.final_state_digest, "output": record.output, "output_digest":
        record.output_digest, "error": record.error, "reason": record.reason.value if record.reason else None,
        "cancelled_by": record.cancelled_by, "attempt": record.attempt, "worker_pid": record.worker_pid,
        "worker_host": record.worker_host, "output_kind": record.output_kind, "params": record.params,
        "matrix_of": record.matrix_of, "ready_at": record.ready_at, "retry_of": record.retry_of,
        "cache_key": record.cache_key, "cache_parts": record.cache_parts, "reused_from": record.reused_from,
        "cpu_user_ms": cost.cpu_user_ms if cost else None, "cpu_system_ms": cost.cpu_system_ms if cost else None,
        "max_rss_bytes": cost.max_rss_bytes if cost else None, "threads": record.threads,
    }
    return {name: view[name] for name, _ in RUN_COLUMNS}  # the table's order, and a test that names match


def expected_for(ledger_path: str, roles: Sequence[Role], quiet: bool) -> dict[int, float]:
    """What the live view's ETA is made of (``runner.history``): read only for a live view on a terminal."""
    if quiet or not sys.stdout.isatty():
        return {}
    from parroles.runner.history import expected_from
    from parroles.runner.reuse import RunKeys

    return expected_from(ledger_path, roles, RunKeys(roles, None, None).code_json)


class ProgressView:
    """Shows a batch while it runs: a live table on a terminal, a line per finished role otherwise."""

    def __init__(self, roles: Sequence[str], *, quiet: bool, needs: Sequence[Sequence[str]] = (),
                 expected_ms: Mapping[int, float] | None = None, slots: int = 1) -> None:
        self.roles = list(roles)
        self.expected_ms = expected_ms or {}  # by position, from the ledger's history: the ETA shown
        self.slots = slots
        position = {name: i for i, name in enumerate(self.roles)}
        # For each role, the positions of the roles it needs: a queued one shows what it still waits for.
        self.needs = [[position[name] for name in wanted if name in position] for wanted in needs] or \
            [[] for _ in self.roles]
        self.status = [RunStatus.QUEUED] * len(roles)
        self.why = [""] * len(roles)
        self.results: list[RoleRunResult | None] = [None] * len(roles)
        self.attempt: list[int] = [1] * len(roles)
        self.started: list[float | None] = [None] * len(roles)
        self.ended: list[float | None] = [None] * len(roles)
        self.quiet = quiet
        self.live_mode = not quiet and sys.stdout.isatty()
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> ProgressView:
        if self.live_mode:
            from rich.live import Live

            # Transient: the live table gives way to the summary, printed once.
            self._live = Live(self, refresh_per_second=8, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)

    def output(self, role: str, stream: str, line: str) -> None:
        """A line a role wrote (``parroles run -v``): ``role | line``, ``role ! line`` for stderr."""
        text = f"{role} {'|' if stream == 'stdout' else '!'} {line}"
        if self._live is not None:
            from rich.text import Text

            self._live.console.print(Text(text))  # above the live table
        else:
            echo(text)

    def update(self, update: RunUpdate) -> None:
        now = time.monotonic()
        with self._lock:
            self.status[update.position] = update.status
            self.attempt[update.position] = update.attempt
            if update.status is RunStatus.RUNNING:
                self.started[update.position] = now
            elif update.status.terminal:
                self.ended[update.position] = now
                self.why[update.position] = why(update.result) if update.result is not None else ""
                self.results[update.position] = update.result
        if not self.live_mode and not self.quiet and update.result is not None:
            result = update.result
            reason = f"  {why(result)}" if why(result) else ""
            echo(f"{result.status.value:<9} {update.role}  {seconds(result.duration_ms)}{reason}".rstrip())
            for line in detail_lines(result):
                echo(line)

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        grid = Table(box=None, show_header=True, header_style="bold")
        for column in ("role", "status", "elapsed", "why"):
            grid.add_column(column)
        with self._lock:
            for position, (role, status, start, end) in enumerate(zip(self.roles, self.status, self.started,
                                                                       self.ended, strict=True)):
                elapsed = "" if start is None else f"{(end or now) - start:.1f} s"
                grid.add_row(Text(role), _styled(status), elapsed, Text(self._why(position)))
            done = sum(s.terminal for s in self.status)
            ran = {p: (now - start) if start is not None else None for p, start in enumerate(self.started)}
            ended = [p for p, status in enumerate(self.status) if status.terminal]
        eta = eta_seconds(self.expected_ms, self.slots, ran, ended)
        grid.caption = f"{done}/{len(self.roles)} done" + (f", about {eta:.0f} s left" if eta is not None else "")
        return grid


    def _why(self, position: int) -> str:
        """Why a run did not complete, or, while it is queued, the roles it still waits for."""
        if self.status[position] is not RunStatus.QUEUED:
            return self.why[position]
        if self.attempt[position] > 1:  # its last attempt failed: the next one waits out its delay
            return f"retrying: attempt {self.attempt[position]} (the last: {self.why[position]})"
        waiting = [self.roles[p] for p in self.needs[position] if self.status[p] is not RunStatus.COMPLETED]
        return f"waiting for {', '.join(waiting)}" if waiting else ""


def _styled(status: RunStatus) -> str:
    colour = {RunStatus.COMPLETED: "green", RunStatus.FAILED: "red", RunStatus.CANCELLED: "yellow",
              RunStatus.RUNNING: "cyan"}.get(status, "dim")
    return f"[{colour}]{status.value}[/{colour}]"


# Names Mermaid takes bare as node ids; anything else (brackets, hyphens, its keywords) gets an id and a label.
_MERMAID_BARE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_MERMAID_KEYWORDS = {"end", "graph", "flowchart", "subgraph", "direction", "style", "class", "classdef", "click",
                     "linkstyle", "default"}


def mermaid(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> str:
    """A Mermaid flowchart: ``graph TD``, then each node that needs a label or has no edge, then one
    ``a --> b`` line per edge, from the needed role to the role that needs it."""
    ids: dict[str, str] = {}
    lines = ["graph TD"]
    linked = {name for edge in edges for name in edge}
    for number, name in enumerate(names):
        bare = (bool(_MERMAID_BARE.fullmatch(name)) and name.lower() not in _MERMAID_KEYWORDS
                and not re.fullmatch(r"n[0-9]+", name))  # the ids given to the others
        ids[name] = name if bare else f"n{number}"
        if not bare:
            # Inside a quoted label '#' starts an entity and '"' ends the label: both as entity codes.
            label = name.replace("#", "#35;").replace('"', "#quot;")
            lines.append(f'    {ids[name]}["{label}"]')
        elif name not in linked:
            lines.append(f"    {name}")
    lines += [f"    {ids[a]} --> {ids[b]}" for a, b in edges]
    return "\n".join(lines)


def dot(names: Sequence[str], edges: Sequence[tuple[str, str]]) -> str:
    """A Graphviz digraph: every role a node, one ``"a" -> "b";`` per edge (needed role to the role needing it)."""
    def quoted(name: str) -> str:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph pipeline {", "    rankdir=TB;"]
    lines += [f"    {quoted(name)};" for name in names]
    lines += [f"    {quoted(a)} -> {quoted(b)};" for a, b in edges]
    return "\n".join([*lines, "}"])
