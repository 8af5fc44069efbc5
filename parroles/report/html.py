"""The report as one HTML file: the template ``templates/report.html.j2`` rendered with Jinja2, every
value escaped by it (autoescape), the pictures inline SVG, the only script a small inline sort; written
to a temporary file beside the target and renamed over it, so no half-written report is ever left."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from parroles.errors import ConfigError
from parroles.report import drawing
from parroles.report.data import BatchView
from parroles.report.diff import BatchDiff
from parroles.results import RunRecord, RunStatus
from parroles.runner.ending import size

FAILURES_SHOWN = 50  # failed or cancelled runs detailed (error, traceback, last output); the rest are counted
ROWS_SHOWN = 200  # runs the table shows at first; the rest are in the page, hidden (a browser lays out a table
# of 10,000 rows in about 3 s here, the same with 200 rows shown in 0.7), until asked for or sorted to the top
MATRIX_SHOWN = 400  # expansions of a matrix role tabled by their values; more are left to the runs table


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A matrix role's expansions by the values of its axes (the params that differ between them);
    with two axes, also as a grid: ``cells[(row value, column value)]``."""

    role: str
    axes: tuple[str, ...]
    runs: tuple[tuple[tuple[str, ...], RunRecord], ...]
    grid: tuple[tuple[str, ...], tuple[str, ...]] | None  # (row values, column values) when there are two axes
    cells: Mapping[tuple[str, str], RunRecord]


def matrices(view: BatchView) -> list[Matrix]:
    """Each matrix role of the batch (``runs.matrix_of``) with at most MATRIX_SHOWN expansions."""
    families: dict[str, list[RunRecord]] = {}
    for run in view.latest.values():
        if run.matrix_of is not None:
            families.setdefault(run.matrix_of, []).append(run)
    found = []
    for role, runs in families.items():
        if len(runs) > MATRIX_SHOWN:
            continue
        keys = list(dict.fromkeys(key for run in runs for key in run.params or {}))
        varying = [k for k in keys if len({json.dumps((r.params or {}).get(k), sort_keys=True) for r in runs}) > 1]
        axes = tuple(varying or keys)
        rows = tuple((tuple(json.dumps((run.params or {}).get(axis)) for axis in axes), run) for run in runs)
        grid, cells = None, {}
        if len(axes) == 2:
            grid = (tuple(dict.fromkeys(values[0] for values, _ in rows)),
                    tuple(dict.fromkeys(values[1] for values, _ in rows)))
            cells = {(values[0], values[1]): run for values, run in rows}
        found.append(Matrix(role, axes, rows, grid, cells))
    return found


def failures(view: BatchView) -> list[RunRecord]:
    """The runs that did not complete, FAILED first, at most FAILURES_SHOWN."""
    ended = [run for run in view.runs if run.status in (RunStatus.FAILED, RunStatus.CANCELLED)]
    ended.sort(key=lambda run: run.status is not RunStatus.FAILED)  # stable: role order within each
    return ended[:FAILURES_SHOWN]


def _size(value: int | None) -> str:
    """Bytes as the run's error says them (``runner.ending.size``: 22 MiB); nothing when unknown."""
    return "" if value is None else size(value)


def _json(value: Any) -> str:
    """A value as JSON text, to be escaped as any other text is (not Jinja's ``tojson``: its Markup is
    not escaped, and it leaves ``"`` as it is, which ends an attribute; it also writes \\u003c for ``<``)."""
    return json.dumps(value, ensure_ascii=False)


def _sort_key(value: float | None) -> str:
    """A number as a table cell's ``data-v`` (what the sort compares): short, exact enough to order by."""
    return "" if value is None else f"{value:.6g}"


def render(view: BatchView, against: BatchDiff | None = None) -> str:
    """The report of ``view`` (with ``against``: how it compares with another batch) as HTML text."""
    import jinja2
    import markupsafe

    environment = jinja2.Environment(loader=jinja2.PackageLoader("parroles.report", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
    environment.filters.update(ms=drawing.format_ms, size=_size, waited=drawing.waited_ms, v=_sort_key,
                               json=_json)
    template = environment.get_template("report.html.j2")
    script = (files("parroles.report") / "templates" / "sort.js").read_text(encoding="utf-8")
    context: dict[str, Any] = {
        "view": view, "batch": view.batch, "timeline": drawing.timeline(view), "graph": drawing.graph(view),
        "matrices": matrices(view), "failures": failures(view), "diff": against, "statuses": list(RunStatus),
        "unfinished": sum(run.status in (RunStatus.FAILED, RunStatus.CANCELLED) for run in view.runs),
        "latest": view.latest, "limits": {"failures": FAILURES_SHOWN, "graph": drawing.GRAPH_LIMIT, "rows": ROWS_SHOWN},
        # The page runs this script alone: the policy names its hash, so no other script would run.
        "script": markupsafe.Markup(script), "script_hash": _csp_hash(script),
    }
    return template.render(context)


def _csp_hash(script: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


def write_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` into ``path`` through a temporary file beside it, renamed over it once whole.

    A symbolic link is written through (the file it names is replaced, the link stays); a path that is not
    a regular file (``/dev/null``, ``/dev/stdout``, a FIFO) is written to as it is, never renamed over: run
    as root, a rename would put a regular file in the place of a device."""
    target = Path(path)
    if target.exists() and not target.is_file() and not target.is_dir():  # through any link: /dev/stdout
        try:
            with open(target, "w", encoding="utf-8") as file:
                file.write(text)
        except OSError as exc:
            raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from exc
        return Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target
