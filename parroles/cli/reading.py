"""The read commands: ``batches``, ``runs``, ``show``, ``logs``, ``sql``, ``export``, ``trace``.

Each is a few lines over the library, registered on the ``parroles`` group
(``commands.cli``). Every one first applies the journals no live writer holds,
when it can take the file within a second (``apply_pending_journals``), then reads.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from parroles.cli.commands import cli, json_option, ledger_option, warnings_on_stderr
from parroles.errors import ConfigError, RunNotFoundError
from parroles.ledger.schema import TABLES

READ_BUSY_TIMEOUT = 3.0  # seconds a read command waits for a writer's lock before exit code 3
APPLY_WAIT = 1.0  # seconds a read command waits to apply journaled records before it reads without them
SHOW_LAST_LINES = 10  # lines of a failed run's output that parroles show gives
FOLLOW_SECONDS = 0.5  # how often parroles logs --follow looks for new lines


@cli.command()
@ledger_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@json_option
def batches(ledger_path: str, limit: int, as_json: bool) -> None:
    """List recent batches, newest first, with their runs' counts by status."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output

    found = reader(ledger_path).list_batches(limit=limit)
    if as_json:
        return cli_output.echo_json(found)
    rows = [[b.batch_id, b.state, b.started_at, *b.counts.values()] for b in found]
    click.echo(formats.table(["batch", "state", "started", "queued", "running", "completed", "failed",
                                 "cancelled"], rows))


@cli.command()
@ledger_option
@click.option("--batch", "batch_id", help="Only the runs of this batch (its id or the start of it), in role order.")
@click.option("--status", type=click.Choice(["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"],
                                            case_sensitive=False))
@click.option("--role", help="Only runs of this role (a matrix role: each of its expansions).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
def runs(ledger_path: str, batch_id: str | None, status: str | None, role: str | None, limit: int,
         as_json: bool) -> None:
    """List runs, newest first."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output

    ledger = reader(ledger_path)
    found = ledger.list_runs(parent_run_id=ledger.resolve_batch_id(batch_id) if batch_id is not None else None,
                             status=status.upper() if status else None, role=role, limit=limit)
    if as_json:
        return cli_output.echo_json([cli_output.run_view(record) for record in found])
    rows = [[r.run_id, r.role, r.status, r.attempt, cli_output.seconds(r.summary.duration_ms),
             r.error.one_line() if r.error else (r.reason or "")] for r in found]
    # "why", as the summary says it: an error, a reason, or how a run completed without running (reused).
    click.echo(formats.table(["run_id", "role", "status", "attempt", "duration", "why"], rows))


@cli.command()
@click.argument("run_id")
@ledger_option
@json_option
def show(run_id: str, ledger_path: str, as_json: bool) -> None:
    """Show one run: its record, its inputs (what the roles it needs handed it), its events, its traceback."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output
    from parroles.ledger.lineage import inputs_of

    ledger = reader(ledger_path)
    run_id = ledger.resolve_run_id(run_id)
    record, events = ledger.get_run(run_id), ledger.get_events(run_id)
    view = formats.to_plain(cli_output.run_view(record))
    inputs = inputs_of(ledger, record.run_id)
    # Attempts link both ways: retry_of is in the row; the attempt that followed this one, if any, here.
    retried_as = [run_id for (run_id,) in ledger.query(
        "SELECT run_id::VARCHAR FROM runs WHERE retry_of = TRY_CAST(? AS UUID)", [record.run_id])]
    if as_json:
        rows = [{"run_id": record.run_id, "seq": e.seq, "kind": e.kind, "payload": e.payload, "ts": e.timestamp}
                for e in events]  # the events table's own column names
        return cli_output.echo_json({"run": view, "retried_as": retried_as[0] if retried_as else None,
                                     "inputs": inputs, "events": rows})
    width = max(map(len, view))
    for key, value in view.items():
        if key not in ("output", "error"):
            click.echo(f"{key:>{width}}: {'-' if value is None else value}")
    click.echo(f"{'output':>{width}}: {json.dumps(view['output'], allow_nan=False)}")
    if retried_as:
        click.echo(f"{'retried as':>{width}}: {retried_as[0]}")
    click.echo(f"\ninputs ({len(inputs)}):")
    for handed in inputs:
        click.echo(f"  {handed.role}  from run {handed.from_run_id}  digest {handed.output_digest}")
    click.echo(f"\nevents ({len(events)}):")
    for event in events:
        click.echo(f"  {event.seq:>4}  {event.timestamp:%H:%M:%S.%f}  {event.kind}  {json.dumps(event.payload)}")
    if record.error is not None:
        click.echo(f"\nerror: {record.error.one_line()}\n{record.error.traceback}".rstrip())
    if record.status.value == "FAILED" and (last := ledger.get_logs(record.run_id, tail=SHOW_LAST_LINES)):
        click.echo(f"\nlast lines it wrote ({len(last)}; all of them: parroles logs {record.run_id}):")
        for line in last:
            click.echo(f"  {'|' if line.stream == 'stdout' else '!'} {line.line}")


@cli.command()
@click.argument("run_id", required=False)
@ledger_option
@click.option("--batch", "batch_id", help="With --role: the run of that role in this batch (its id or its start).")
@click.option("--role", help="With --batch: the role whose run to print.")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), help="Only this stream, its lines as written.")
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N lines.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
def logs(run_id: str | None, ledger_path: str, batch_id: str | None, role: str | None, stream: str | None,
         tail: int | None, follow: bool) -> None:
    """Print what a run wrote to its stdout and stderr, in order: "| line" from stdout, "! line" from stderr.

    The run is RUN_ID (or the start of it), or --batch B --role R.
    """
    ledger = reader(ledger_path)
    run_id = _run_of(ledger, run_id, batch_id, role)
    seen, ended = 0, False
    lines = ledger.get_logs(run_id, stream=stream, tail=tail)
    while True:
        for line in lines:
            click.echo(line.line if stream else f"{'|' if line.stream == 'stdout' else '!'} {line.line}")
            seen = line.seq
        if not follow or ended:
            return
        time.sleep(FOLLOW_SECONDS)
        ended = ledger.get_run(run_id).status.terminal  # its last lines may come with its end: one more read
        lines = ledger.get_logs(run_id, stream=stream, after=seen)


def _run_of(ledger: Any, run_id: str | None, batch_id: str | None, role: str | None) -> str:
    """The run named by its id (or the start of it), or by its batch and role; ConfigError if not one."""
    if (run_id is None) == (batch_id is None or role is None):
        raise ConfigError("name the run: give RUN_ID, or --batch and --role (not both)")
    if run_id is not None:
        return str(ledger.resolve_run_id(run_id))
    found = ledger.list_runs(parent_run_id=ledger.resolve_batch_id(batch_id), role=role)
    exact = [record for record in found if str(record.role) == role] or found
    if len(exact) != 1:
        if not exact:
            raise RunNotFoundError(f"no run of role {role!r} in batch {batch_id}")
        raise ConfigError(f"role {role!r} has {len(exact)} runs in batch {batch_id}: give the RUN_ID")
    return str(exact[0].run_id)


def _finite_seconds(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise click.BadParameter(f"must be a finite number of seconds > 0, got {value}")
    return value


# ignore_unknown_options: a query that starts with a comment ("-- ...") is a query, not an option.
@cli.command(context_settings={"ignore_unknown_options": True},
             help=f"""Run one read-only SQL QUERY over the ledger (tables: {', '.join(TABLES)}).

    The query comes from the argument, from --file, or from stdin (QUERY '-', or
    no QUERY with stdin not a terminal).
    """)
@click.argument("query", required=False)
@ledger_option
@click.option("--file", "query_file", type=click.File("r"), help="Read the query from this file ('-': stdin).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--query-timeout", "timeout", type=float, default=30.0, show_default=True, callback=_finite_seconds,
              help="Interrupt the query once it has spent this many seconds in DuckDB.")
# --timeout means the role timeout in `run`; here it was the query's. The old spelling still works, and says so.
@click.option("--timeout", "old_timeout", type=float, hidden=True, callback=_finite_seconds)
@click.option("--max-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Print at most this many rows (a note on stderr says when more were left out).")
def sql(query: str | None, ledger_path: str, query_file: Any, fmt: str, timeout: float, old_timeout: float | None,
        max_rows: int) -> None:
    from parroles.cli import output as cli_output
    from parroles.errors import UnsafeQueryError

    if old_timeout is not None:
        click.echo("parroles: note: sql's --timeout is now --query-timeout (in parroles run, --timeout is the "
                   "role timeout); the old spelling still works", err=True)
        timeout = old_timeout
    from parroles.ledger import journals_to_apply
    from parroles.ledger import query as safe_sql

    query = _query_text(query, query_file)
    safe_sql.check_query(query)
    path = str(Path(ledger_path).resolve())
    # A query that fails touches nothing, journals included; DuckDB refuses some queries only as it runs
    # them, so with journals to apply the query is run to its end first, on what is committed.
    if journals_to_apply(path):
        safe_sql.rehearse(path, query, timeout, READ_BUSY_TIMEOUT, max_rows)
    reader(ledger_path)  # applies the journals; a DuckDB file that is no ledger: exit 3, nothing run
    with safe_sql.answer(path, query, timeout, READ_BUSY_TIMEOUT, max_rows) as answer:
        try:
            cli_output.print_answer(fmt, answer.columns, answer.batches(), answer.json_columns)
        except MemoryError as exc:  # printing a batch: the rows are too large for what this process may hold
            raise UnsafeQueryError(safe_sql.OUT_OF_MEMORY) from exc
    if answer.truncated:
        click.echo(f"parroles: note: only the first {max_rows} rows are shown (--max-rows)", err=True)


def _query_text(query: str | None, query_file: Any) -> str:
    if query is not None and query_file is not None:
        raise ConfigError("give the query as an argument or with --file, not both")
    if query_file is not None:
        return str(query_file.read())
    # sys.stdin, not click.get_text_stream (deprecated in click 8.5); click's test runner swaps both alike.
    if query == "-" or (query is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if query is None:
        raise ConfigError("no query: give one as an argument, with --file, or on stdin")
    return query


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@ledger_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True)
def export(folder: str, ledger_path: str, fmt: str) -> None:
    """Write every ledger table to FOLDER, a file each."""
    from parroles.ledger.export import export_tables

    reader(ledger_path)  # applies the journals; a DuckDB file that is no ledger: exit 3, nothing exported
    for path in export_tables(str(Path(ledger_path).resolve()), folder, fmt, READ_BUSY_TIMEOUT):
        click.echo(str(path))


@cli.command()
@click.argument("batch_id")
@ledger_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Trace file to write.")
def trace(batch_id: str, ledger_path: str, output: str) -> None:
    """Write BATCH_ID as a Chrome trace (open it in Perfetto or chrome://tracing)."""
    from parroles.ledger.export import batch_trace

    ledger = reader(ledger_path)
    document = batch_trace(ledger, ledger.resolve_batch_id(batch_id))
    try:
        Path(output).write_text(json.dumps(document))
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(f"{output}: {len(document['traceEvents'])} trace events")


def apply_pending_journals(ledger_path: str) -> None:
    """Apply what the ledger's journals hold if the file can be taken for a moment; else say what is not shown."""
    from parroles.ledger import apply_journals

    with warnings_on_stderr():
        pending = apply_journals(ledger_path, APPLY_WAIT)
    if pending:
        click.echo(f"parroles: note: {pending} record(s) of the ledger wait in its journal and are not shown yet; "
                   "the next open that can write the ledger applies them", err=True)


def reader(ledger_path: str) -> Any:
    """The ledger, read-only, after its journals were applied; one an older parroles wrote is first brought
    up to date (a writable open migrates it), since the read commands ask for the columns of this version."""
    from parroles.ledger import Ledger
    from parroles.ledger.schema import SCHEMA_VERSION

    apply_pending_journals(ledger_path)
    ledger = Ledger(ledger_path, read_only=True, busy_timeout=READ_BUSY_TIMEOUT)
    if ledger.schema_version < SCHEMA_VERSION:
        ledger.close()
        Ledger(ledger_path, busy_timeout=READ_BUSY_TIMEOUT).close_writer(READ_BUSY_TIMEOUT)
        ledger = Ledger(ledger_path, read_only=True, busy_timeout=READ_BUSY_TIMEOUT)
    return ledger
