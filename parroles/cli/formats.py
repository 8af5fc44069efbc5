"""How values leave the ledger: exact in the machine formats, shortened (and said so) in a table.

``--format csv`` and ``--format json`` (and every command's ``--json``) carry
each value exactly: floats round-trip (``repr``), text whole, timestamps ISO
8601 with microseconds and offset, JSON columns as JSON values (their text in
CSV), NULL as an empty CSV cell or ``null``. Only the table view abbreviates,
and it ends with a note when it did. ``parroles sql`` prints its answer as it
fetches it, a batch of rows at a time, so an answer is never held whole.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import decimal
import enum
import io
import json
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TABLE_CELL = 80  # characters a table cell shows of a longer value
TABLE_DIGITS = 6  # significant digits a table shows of a float (exact values: --format csv or json)
SHORTENED_NOTE = "(values shortened; the machine formats, --json or --format csv|json, are exact)"
# ``parroles sql`` prints its table as it fetches it, sized on the first rows (their cells,
# at most TABLE_CELL characters each, are all that is held); a later, wider cell widens its own line.
TABLE_SIZING_ROWS = 2_048

Echo = Callable[..., None]


def to_plain(value: Any) -> Any:
    """Records, enums, timestamps, decimals as exact JSON values (NaN and infinities become null: strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return to_plain(value.to_dict())
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, (dt.date, dt.time, dt.timedelta, uuid.UUID)):
        return value.isoformat() if isinstance(value, (dt.date, dt.time)) else str(value)
    if isinstance(value, decimal.Decimal):
        return _decimal(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _decimal(value: decimal.Decimal) -> float | str:
    """A JSON number when a float carries it exactly (as it is written), else its exact text."""
    as_float = float(value)
    exact = math.isfinite(as_float) and decimal.Decimal(repr(as_float)) == value
    return as_float if exact else str(value)


def csv_cell(value: Any, is_json: bool = False) -> str:
    """A value exactly, as one CSV cell: NULL empty, a JSON column's text as is, nested values as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value  # text, and a JSON column's JSON text
    if isinstance(value, (bool, int, float, decimal.Decimal)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_plain(value), ensure_ascii=False, allow_nan=False)
    plain = to_plain(value)
    return plain if isinstance(plain, str) else str(plain)


class TableCells:
    """Values as a table shows them: short, and remembered when shortened (the table says so at its end)."""

    def __init__(self) -> None:
        self.shortened = False

    def cell(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            text = f"{value:.{TABLE_DIGITS}g}"
            self.shortened |= math.isfinite(value) and float(text) != value
            return text
        if isinstance(value, dt.datetime):
            self.shortened |= value.microsecond != 0 or value.tzinfo is not None
            return value.strftime("%Y-%m-%d %H:%M:%S")
        text = str(value.value if isinstance(value, enum.Enum) else value)
        if not text.isprintable():  # a line break or NUL would break the table's lines: shown escaped
            self.shortened = True
            text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
        if len(text) <= TABLE_CELL:
            return text
        self.shortened = True
        return text[:TABLE_CELL - 3] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table (a note at its end when a value was shortened)."""
    cells = TableCells()
    lines = _sized(headers, [[cells.cell(v) for v in row] for row in rows])
    return "\n".join([*lines, SHORTENED_NOTE] if cells.shortened else lines)


def _widths(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[int]:
    return [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]


def _table_head(headers: Sequence[str], widths: Sequence[int]) -> list[str]:
    return [_table_line(headers, widths), "  ".join("-" * w for w in widths)]


def _table_line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _sized(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> list[str]:
    widths = _widths(headers, cells)
    return [*_table_head(headers, widths), *(_table_line(row, widths) for row in cells)]


Rows = Iterable[Sequence[Sequence[Any]]]


def print_answer(echo: Echo, fmt: str, headers: Sequence[str], batches: Rows,
                 json_columns: frozenset[int] = frozenset()) -> None:
    """A query's answer as a table, CSV or JSON, printed a batch of rows at a time (never held whole).

    ``json_columns``: positions of JSON columns (their values are JSON text).
    """
    if fmt == "json":
        _print_json(echo, headers, batches, json_columns)
    elif fmt == "csv":
        _print_csv(echo, headers, batches, json_columns)
    else:
        _print_table(echo, headers, batches)


def _print_json(echo: Echo, headers: Sequence[str], batches: Rows, json_columns: frozenset[int]) -> None:
    names = distinct_names(headers)
    started = False
    for batch in batches:
        objects = (json.dumps({name: _json_value(value, i in json_columns)
                               for i, (name, value) in enumerate(zip(names, row, strict=True))},
                              indent=2, ensure_ascii=False, allow_nan=False) for row in batch)
        echo(("," if started else "[") + "\n" + ",\n".join(_indented(text) for text in objects), nl=False)
        started = True
    echo("\n]" if started else "[]")


def _indented(text: str) -> str:
    # By "\n" alone: textwrap would also break at U+2028, U+0085..., which JSON text holds raw.
    return "\n".join("  " + line for line in text.split("\n"))


def distinct_names(headers: Sequence[str]) -> list[str]:
    """Column names as JSON keys: a name that comes again is ``name#2``, ``name#3``... so no value is lost."""
    seen: dict[str, int] = {}
    names = []
    for name in headers:
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return names


def _json_value(value: Any, is_json: bool) -> Any:
    if is_json and isinstance(value, str):
        # The column's JSON value itself, not its text in a string; its numbers as written (1e400 is no float).
        return to_plain(json.loads(value, parse_float=decimal.Decimal))
    return to_plain(value)


def _print_csv(echo: Echo, headers: Sequence[str], batches: Rows, json_columns: frozenset[int]) -> None:
    header = _csv_lines([headers])  # printed with the first rows: a query that fails at once prints nothing
    for batch in batches:
        echo(header + _csv_lines([[csv_cell(v, i in json_columns) for i, v in enumerate(row)] for row in batch]),
             nl=False)
        header = ""
    if header:
        echo(header, nl=False)


def _csv_lines(rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _print_table(echo: Echo, headers: Sequence[str], batches: Rows) -> None:
    values = TableCells()
    first: list[list[str]] = []  # the cells the columns are sized on
    widths: list[int] | None = None
    for batch in batches:
        cells = [[values.cell(v) for v in row] for row in batch]
        if widths is None:
            first += cells
            if len(first) < TABLE_SIZING_ROWS:
                continue
            widths, cells, first = _widths(headers, first), first, []
            echo("\n".join(_table_head(headers, widths)))
        echo("\n".join(_table_line(row, widths) for row in cells))
    if widths is None:  # fewer rows than TABLE_SIZING_ROWS: sized on them all
        echo("\n".join(_sized(headers, first)))
    if values.shortened:
        echo(SHORTENED_NOTE)
