"""The report's pictures as shapes with coordinates (SVG user units); the template only writes them out.

The timeline: a lane per worker slot busy at once (``layout.pack_lanes``), a bar per run that started,
its queue wait as a thin line before it, and a last row for the runs that never ran (reused, or
cancelled before they started). The graph: the roles in layers, left to right, what they need first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Sequence

from parroles.report import layout
from parroles.report.data import BatchView, Need
from parroles.results import Reason, RunRecord

WIDTH = 1000.0  # the timeline's width in SVG units; the page scales it to the window
LABELS = 78.0  # room for the lane names on the left
LANE = 22.0  # a lane's height
BAR = 14.0  # a bar's height within it
TICKS = 8  # the time axis's ticks, about
CHAR = 6.2  # the width of a character of the labels, about (11 px sans-serif)

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 160.0, 28.0, 56.0, 12.0, 8.0
GRAPH_LIMIT = 300  # roles beyond which the graph is not drawn (its layers are listed instead)


@dataclasses.dataclass(frozen=True)
class Bar:
    x: float
    width: float
    status: str
    title: str
    label: str  # the role's name when it fits in the bar, else ""
    retry: bool


@dataclasses.dataclass(frozen=True)
class Lane:
    name: str
    y: float  # the top of its bars
    bars: tuple[Bar, ...]
    waits: str  # an SVG path of its runs' queue waits, a subpath each (one element, however many runs)
    never_ran: bool = False  # the lane of the runs that never started: a mark each, when it ended


@dataclasses.dataclass(frozen=True)
class Timeline:
    width: float
    height: float
    lanes: tuple[Lane, ...]  # top to bottom
    ticks: tuple[tuple[float, str], ...]  # (x, label) of the time axis


@dataclasses.dataclass(frozen=True)
class Node:
    x: float
    y: float
    name: str
    label: str
    status: str
    title: str


@dataclasses.dataclass(frozen=True)
class Edge:
    path: str
    kind: str
    title: str


@dataclasses.dataclass(frozen=True)
class Graph:
    width: float
    height: float
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    layers: tuple[tuple[str, ...], ...]  # each layer's roles, for the list shown instead of a large graph


def _seconds(moment: dt.datetime | None, origin: dt.datetime) -> float | None:
    return None if moment is None else (moment - origin).total_seconds()


def waited_ms(run: RunRecord) -> float | None:
    """How long a run that started waited for a worker slot: from its needs being met (from being queued, in
    a ledger from before ``ready_at``) to its start."""
    since = run.ready_at or run.queued_at
    return None if run.started_at is None else max((run.started_at - since).total_seconds() * 1000, 0.0)


def run_title(run: RunRecord) -> str:
    """What hovering a run says: its role, how it ended, how long it ran and waited, its attempts and reuse."""
    lines = [f"{run.role}: {run.status.value}" + (f" ({run.reason.value})" if run.reason else "")]
    if run.summary.duration_ms is not None:
        lines.append(f"ran {format_ms(run.summary.duration_ms)}")
    if (waited := waited_ms(run)) is not None and waited > 0:
        lines.append(f"waited {format_ms(waited)} for a worker slot")
    if run.attempt > 1 or run.retry_of:
        lines.append(f"attempt {run.attempt}" + (f", retry of run {run.retry_of[:8]}" if run.retry_of else ""))
    if run.reused_from:
        lines.append(f"reused the output of run {run.reused_from[:8]}")
    if run.error is not None:
        lines.append(run.error.one_line()[:200])
    return "\n".join(lines)


def format_ms(ms: float | None) -> str:
    """A duration for a person: 850 ms, 1.25 s, 2 min 5 s."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms:.3g} ms"
    if ms < 60_000:
        return f"{ms / 1000:.3g} s"
    return f"{int(ms // 60_000)} min {round(ms % 60_000 / 1000)} s"


def timeline(view: BatchView) -> Timeline:
    """Every run of the batch on the timeline."""
    origin = view.origin
    held_a_slot = [run.started_at is not None and run.reason is not Reason.REUSED for run in view.runs]
    ran = [run for run, held in zip(view.runs, held_a_slot, strict=True) if held]
    never = [run for run, held in zip(view.runs, held_a_slot, strict=True) if not held]
    ends = [_seconds(m, origin) or 0.0 for run in view.runs for m in (run.finished_at, run.started_at, run.queued_at)]
    total = max([*ends, _seconds(view.batch.finished_at, origin) or 0.0, 1e-3])
    scale = (WIDTH - LABELS - 24) / total  # room on the right for the last tick's label
    spans = [(_seconds(r.started_at, origin) or 0.0, _seconds(r.finished_at, origin) or total) for r in ran]
    placed = layout.pack_lanes(spans)
    lanes = []
    for lane in range(max(placed, default=-1) + 1):
        mine = [(run, span) for run, span, at in zip(ran, spans, placed, strict=True) if at == lane]
        bars = tuple(_bar(run, LABELS + start * scale, (end - start) * scale) for run, (start, end) in mine)
        waits = "".join(f"M{bar.x - waited:.1f} 0H{bar.x}" for (run, _), bar in zip(mine, bars, strict=True)
                        if (waited := (waited_ms(run) or 0.0) / 1000 * scale) > 0.5)
        lanes.append(Lane(f"slot {lane + 1}", lane * LANE + (LANE - BAR) / 2, bars, waits))
    if never:
        moments = [_seconds(run.finished_at or run.queued_at, origin) or 0.0 for run in never]
        marks = tuple(_bar(run, LABELS + moment * scale - 3, 6) for run, moment in zip(never, moments, strict=True))
        lanes.append(Lane("did not run", len(lanes) * LANE + (LANE - BAR) / 2, marks, "", never_ran=True))
    step = _tick_step(total)
    ticks = tuple((round(LABELS + i * step * scale, 1), format_ms(i * step * 1000) if i else "0")
                  for i in range(int(total / step) + 1))
    return Timeline(WIDTH, len(lanes) * LANE + 20, tuple(lanes), ticks)


def _bar(run: RunRecord, x: float, width: float) -> Bar:
    label = str(run.role) if len(str(run.role)) * CHAR + 6 < width else ""
    return Bar(round(x, 1), round(max(width, 0.6), 1), run.status.value, run_title(run), label, run.attempt > 1)


def _tick_step(total: float) -> float:
    """A round step (1, 2 or 5 times a power of ten seconds) giving about TICKS ticks over ``total``."""
    rough = total / TICKS
    power = 10.0 ** math.floor(math.log10(rough))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= rough)


def graph(view: BatchView) -> Graph | None:
    """The roles and their needs in layers; None when no role needs another (the report lists them)."""
    latest = view.latest
    names = list(latest)
    pairs = [(need.needed, need.needing) for need in view.needs if need.needed in latest and need.needing in latest]
    if not pairs:
        return None
    depth = layout.layers(names, pairs)
    layers = tuple(tuple(name for name in names if depth[name] == d) for d in range(max(depth.values()) + 1))
    if len(names) > GRAPH_LIMIT:
        return Graph(0, 0, (), (), layers)
    row = layout.order_in_layers(names, pairs, depth)
    tallest = max(len(layer) for layer in layers)
    # Each layer centred on the tallest: a fan-in's one role sits across from the middle of what it needs.
    at = {name: (MARGIN + depth[name] * (NODE_W + GAP_X),
                 MARGIN + (row[name] + (tallest - len(layers[depth[name]])) / 2) * (NODE_H + GAP_Y)) for name in names}
    fits = int((NODE_W - 12) / CHAR)
    nodes = tuple(Node(*at[name], name, name if len(name) <= fits else name[:fits - 1] + "…",
                       latest[name].status.value, run_title(latest[name])) for name in names)
    edges = tuple(_edge(need, at) for need in _drawn(view.needs, latest))
    width = MARGIN * 2 + len(layers) * NODE_W + (len(layers) - 1) * GAP_X
    height = MARGIN * 2 + tallest * (NODE_H + GAP_Y) - GAP_Y
    return Graph(width, height, nodes, edges, layers)


def _drawn(needs: Sequence[Need], latest: dict[str, RunRecord]) -> list[Need]:
    return [need for need in needs if need.needed in latest and need.needing in latest]


EDGE_SAYS = {"handoff": "handed its output to", "need": "is needed by (nothing was handed over)",
             "cancelled_by": "ended, which cancelled"}


def _edge(need: Need, at: dict[str, tuple[float, float]]) -> Edge:
    (x1, y1), (x2, y2) = at[need.needed], at[need.needing]
    x1, y1, y2 = x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2
    middle = (x1 + x2) / 2
    path = f"M{x1:.1f},{y1:.1f} C{middle:.1f},{y1:.1f} {middle:.1f},{y2:.1f} {x2 - 4:.1f},{y2:.1f}"
    return Edge(path, need.kind, f"{need.needed} {EDGE_SAYS[need.kind]} {need.needing}")
