"""The ``parroles`` command: a thin layer over the Python API.

Errors become exit codes in one place, ``ParrolesGroup.invoke``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from parroles import backends, signals
from parroles.config import DEFAULT_LEDGER, LEDGER_ENV
from parroles.errors import ConfigError, ParrolesError, SpecError
from parroles.ledger.schema import TABLES

READ_BUSY_TIMEOUT = 3.0  # seconds a read command waits for a writer's lock before exit code 3
APPLY_WAIT = 1.0  # seconds a read command waits to apply journaled records before it reads without them
SHOW_LAST_LINES = 10  # lines of a failed run's output that parroles show gives
FOLLOW_SECONDS = 0.5  # how often parroles logs --follow looks for new lines
EXIT_CODES = """\b
Exit codes:
  0    every role completed
  1    a role failed or was cancelled
  2    usage or spec error (nothing ran), or a query refused or unfinished
  3    ledger error (busy beyond the wait, not a ledger, damaged, unwritable, missing)
  4    no such run or batch in the ledger
  5    the execution backend cannot be reached (e.g. a Dask scheduler)
  130  interrupted (SIGINT)
  143  terminated (SIGTERM)
"""


class ParrolesGroup(click.Group):
    """Turns parroles errors into one-line messages and their exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            if ctx.invoked_subcommand != "run":
                signals.stop_deferring()  # a read or an export: Ctrl-C stops it at once, as usual
            return super().invoke(ctx)
        except SpecError as exc:
            click.echo(f"parroles: error: {exc.path}: {len(exc.problems)} problem(s) in the spec", err=True)
            for problem in exc.problems:
                click.echo(f"  - {problem}", err=True)
            ctx.exit(exc.exit_code)
        except ParrolesError as exc:
            click.echo(f"parroles: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("parroles: interrupted", err=True)
            ctx.exit(130)


def _ledger_path(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """A command's --ledger, else the group's (``parroles --ledger X runs``), else $PARROLES_LEDGER, else
    the default."""
    return value or ctx.find_root().params.get("ledger_path") or DEFAULT_LEDGER


LEDGER_HELP = f"The DuckDB ledger file (or set PARROLES_LEDGER; default {DEFAULT_LEDGER})."
ledger_option = click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False), callback=_ledger_path,
                             help=LEDGER_HELP)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=ParrolesGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="parroles")
@click.option("--ledger", "ledger_path", envvar=LEDGER_ENV, type=click.Path(dir_okay=False),
              help=LEDGER_HELP + " Every command takes it too.")
def cli(ledger_path: str | None) -> None:
    """Run CPU-heavy roles in parallel processes; query every run in a DuckDB ledger."""


@cli.command(epilog=EXIT_CODES)
@click.argument("spec", type=click.Path(dir_okay=False))
@ledger_option
@click.option("--max-concurrent", type=int, help="Roles running at once (overrides the spec).")
@click.option("--fail-fast/--no-fail-fast", default=None, help="Cancel the rest on the first failure.")
@click.option("--timeout", type=float, help="Seconds each role may run (overrides role_timeout).")
@click.option("--backend", type=click.Choice(backends.NAMES), help="Where roles run (default loky: this machine).")
@click.option("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (implies --backend dask).")
@click.option("--connect-timeout", type=float,
              help="Seconds to wait for the Dask scheduler (default 10); then exit 5, nothing run.")
@click.option("--ledger-wait", type=float,
              help="Seconds to wait for a busy ledger file (default 10); past the last role, records wait in "
                   "the journal instead.")
@json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@click.option("--verbose", "-v", is_flag=True, help="Show what roles print, live, as 'role | line'.")
def run(spec: str, ledger_path: str, max_concurrent: int | None, fail_fast: bool | None,
        timeout: float | None, backend: str | None, scheduler: str | None, connect_timeout: float | None,
        ledger_wait: float | None, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Run the roles of a SPEC file (TOML) and record them in the ledger (what roles print: parroles logs)."""
    with signals.deferred():  # from here on, Ctrl-C cancels the batch cleanly (see parroles.signals)
        _run(spec, ledger_path, max_concurrent, fail_fast, timeout, backend, scheduler, connect_timeout,
             ledger_wait, as_json, quiet, verbose)


def _run(spec: str, ledger_path: str, max_concurrent: int | None, fail_fast: bool | None,
         timeout: float | None, backend: str | None, scheduler: str | None, connect_timeout: float | None,
         ledger_wait: float | None, as_json: bool, quiet: bool, verbose: bool) -> None:
    from parroles import spec as specs
    from parroles.runner import workers

    loaded = specs.load_spec(spec)
    config = loaded.config(max_concurrent=max_concurrent, fail_fast=fail_fast, role_timeout=timeout,
                           backend=backend or ("dask" if scheduler else None), dask_address=scheduler,
                           connect_timeout=connect_timeout, ledger_wait=ledger_wait)
    if loaded.roles:  # they boot while the rest of the command loads and the ledger opens
        workers.start_workers(config.workers_for(len(loaded.roles)), config)
    from parroles import errors
    from parroles.cli import output as cli_output
    from parroles.runner import execute as executor

    batch_id = f"{loaded.name}-{uuid.uuid4().hex[:12]}"
    view = cli_output.ProgressView([r.name for r in loaded.roles], quiet=quiet or as_json,
                                   needs=[r.needs for r in loaded.roles])
    interrupted: BaseException | None = None
    with _warnings_on_stderr(), view:
        try:
            results = executor.execute_roles_parallel(
                ledger_path, batch_id, loaded.pipeline(), loaded.digest, config,
                name=loaded.name, sys_path=[str(loaded.path.parent.resolve())],
                on_update=view.update, on_output=view.output if verbose else None)
        except errors.ParallelExecutionFailed as exc:
            results = exc.results
        except (KeyboardInterrupt, errors.BatchInterrupted) as exc:
            # Every run of the batch was ended (and reported to the view) before this reached us.
            interrupted, results = exc, [r for r in view.results if r is not None]
    if interrupted is not None:
        if results:  # the batch was recorded: show how it ended, as for any other ending
            cli_output.echo(cli_output.summary(results))
            cli_output.echo(f"batch {batch_id} in {ledger_path}")
        raise interrupted
    if as_json:
        cli_output.echo_json({"batch_id": batch_id, "ledger": ledger_path, "results": results})
    else:
        cli_output.echo(cli_output.summary(results))
        cli_output.echo(f"batch {batch_id} in {ledger_path}")
    click.get_current_context().exit(0 if all(r.success for r in results) else 1)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
def graph(spec: str, fmt: str) -> None:
    """Print the roles of a SPEC file and what each needs, as a Mermaid or Graphviz graph."""
    from parroles import spec as specs
    from parroles.cli import output as cli_output

    loaded = specs.load_spec(spec)  # a bad spec: its problems and exit 2, as for run
    names = [role.name for role in loaded.roles]
    render = cli_output.mermaid if fmt == "mermaid" else cli_output.dot
    click.echo(render(names, loaded.edges()))


@cli.command()
@ledger_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@json_option
def batches(ledger_path: str, limit: int, as_json: bool) -> None:
    """List recent batches, newest first, with their runs' counts by status."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output

    found = _reader(ledger_path).list_batches(limit=limit)
    if as_json:
        return cli_output.echo_json(found)
    rows = [[b.batch_id, b.state, b.started_at, *b.counts.values()] for b in found]
    click.echo(formats.table(["batch", "state", "started", "queued", "running", "completed", "failed",
                                 "cancelled"], rows))


@cli.command()
@ledger_option
@click.option("--batch", "batch_id", help="Only the runs of this batch, in role order.")
@click.option("--status", type=click.Choice(["QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"],
                                            case_sensitive=False))
@click.option("--role", help="Only runs of this role.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
def runs(ledger_path: str, batch_id: str | None, status: str | None, role: str | None, limit: int,
         as_json: bool) -> None:
    """List runs, newest first."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output

    found = _reader(ledger_path).list_runs(
        parent_run_id=batch_id, status=status.upper() if status else None, role=role, limit=limit)
    if as_json:
        return cli_output.echo_json([cli_output.run_view(record) for record in found])
    rows = [[r.run_id, r.role, r.status, r.attempt, cli_output.seconds(r.summary.duration_ms),
             r.error.one_line() if r.error else (r.reason or "")] for r in found]
    click.echo(formats.table(["run_id", "role", "status", "attempt", "duration", "error"], rows))


@cli.command()
@click.argument("run_id")
@ledger_option
@json_option
def show(run_id: str, ledger_path: str, as_json: bool) -> None:
    """Show one run: its record, its inputs (what the roles it needs handed it), its events, its traceback."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output
    from parroles.ledger.lineage import inputs_of

    ledger = _reader(ledger_path)
    record, events = ledger.get_run(run_id), ledger.get_events(run_id)
    view = formats.to_plain(cli_output.run_view(record))
    inputs = inputs_of(ledger, record.run_id)
    if as_json:
        return cli_output.echo_json({"run": view, "inputs": inputs, "events": events})
    for key, value in view.items():
        if key not in ("output", "error"):
            click.echo(f"{key:>14}: {'-' if value is None else value}")
    click.echo(f"{'output':>14}: {json.dumps(view['output'], allow_nan=False)}")
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
@click.argument("run_id")
@ledger_option
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), help="Only this stream.")
@click.option("--tail", type=click.IntRange(min=1), help="Only the last N lines.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
def logs(run_id: str, ledger_path: str, stream: str | None, tail: int | None, follow: bool) -> None:
    """Print what a run wrote to its stdout and stderr, in order."""
    ledger = _reader(ledger_path)
    ledger.get_run(run_id)  # not found: exit 4
    seen, ended = 0, False
    lines = ledger.get_logs(run_id, stream=stream, tail=tail)
    while True:
        for line in lines:
            click.echo(line.line)
            seen = line.seq
        if not follow or ended:
            return
        time.sleep(FOLLOW_SECONDS)
        ended = ledger.get_run(run_id).status.terminal  # its last lines may come with its end: one more read
        lines = ledger.get_logs(run_id, stream=stream, after=seen)


def _finite_seconds(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
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
@click.option("--timeout", type=float, default=30.0, show_default=True, callback=_finite_seconds,
              help="Interrupt the query once it has spent this many seconds in DuckDB.")
@click.option("--max-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Print at most this many rows (a note on stderr says when more were left out).")
def sql(query: str | None, ledger_path: str, query_file: Any, fmt: str, timeout: float, max_rows: int) -> None:
    from parroles.cli import output as cli_output
    from parroles.errors import UnsafeQueryError
    from parroles.ledger import journals_to_apply
    from parroles.ledger import query as safe_sql

    query = _query_text(query, query_file)
    safe_sql.check_query(query)
    path = str(Path(ledger_path).resolve())
    # A query that fails touches nothing, journals included; DuckDB refuses some queries only as it runs
    # them, so with journals to apply the query is run to its end first, on what is committed.
    if journals_to_apply(path):
        safe_sql.rehearse(path, query, timeout, READ_BUSY_TIMEOUT, max_rows)
    _apply_journals(ledger_path)
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

    _apply_journals(ledger_path)
    for path in export_tables(str(Path(ledger_path).resolve()), folder, fmt, READ_BUSY_TIMEOUT):
        click.echo(str(path))


@cli.command()
@click.argument("batch_id")
@ledger_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Trace file to write.")
def trace(batch_id: str, ledger_path: str, output: str) -> None:
    """Write BATCH_ID as a Chrome trace (open it in Perfetto or chrome://tracing)."""
    from parroles.ledger.export import batch_trace

    document = batch_trace(_reader(ledger_path), batch_id)
    try:
        Path(output).write_text(json.dumps(document))
    except OSError as exc:
        raise ConfigError(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(f"{output}: {len(document['traceEvents'])} trace events")


@contextlib.contextmanager
def _warnings_on_stderr() -> Iterator[None]:
    """parroles' own warnings as one ``parroles: warning:`` line each, after the work they concern."""
    from parroles.errors import ParrolesWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ParrolesWarning)
        try:
            yield
        finally:
            for warning in caught:
                if isinstance(warning.message, ParrolesWarning):
                    click.echo(f"parroles: warning: {warning.message}", err=True)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _apply_journals(ledger_path: str) -> None:
    """Apply what the ledger's journals hold if the file can be taken for a moment; else say what is not shown."""
    from parroles.ledger import apply_journals

    with _warnings_on_stderr():
        pending = apply_journals(ledger_path, APPLY_WAIT)
    if pending:
        click.echo(f"parroles: note: {pending} record(s) of the ledger wait in its journal and are not shown yet; "
                   "the next open that can write the ledger applies them", err=True)


def _reader(ledger_path: str) -> Any:
    from parroles.ledger import Ledger

    _apply_journals(ledger_path)
    return Ledger(ledger_path, read_only=True, busy_timeout=READ_BUSY_TIMEOUT)


def main() -> None:
    cli(prog_name="parroles")
