"""The commands that show a batch to look at: ``report`` (one offline HTML file) and ``diff`` (two batches
side by side). A few lines each over ``parroles.report``."""

from __future__ import annotations

import click

from parroles.cli.commands import cli, json_option, ledger_option


@cli.command()
@click.argument("batch")
@ledger_option
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="The HTML file to write (default: parroles-report-<batch id>.html).")
@click.option("--against", help="Compare with this batch (its id or the start of it), as parroles diff does.")
def report(batch: str, ledger_path: str, output: str | None, against: str | None) -> None:
    """Write BATCH as one HTML file that works offline: its timeline, the graph of its needs, its runs
    (sortable), its failures with their tracebacks and last output, its matrix roles by their values."""
    from parroles.cli.reading import reader
    from parroles.report import write_report

    with reader(ledger_path) as ledger:
        written = write_report(ledger, batch, output, against)
    click.echo(str(written))


@cli.command()
@click.argument("batch_a")
@click.argument("batch_b")
@ledger_option
@json_option
def diff(batch_a: str, batch_b: str, ledger_path: str, as_json: bool) -> None:
    """Compare BATCH_A with BATCH_B role by role (matched by name): status, duration and its ratio, whether
    the output or the params changed, reuse; the roles only one has; and a one-line summary."""
    from parroles.cli import formats
    from parroles.cli import output as cli_output
    from parroles.cli.reading import reader
    from parroles.report import diff_batches

    with reader(ledger_path) as ledger:
        found = diff_batches(ledger, batch_a, batch_b)
    if as_json:
        return cli_output.echo_json(found)
    rows = [[c.role, c.status_b.value if c.status_a is c.status_b else f"{c.status_a.value} -> {c.status_b.value}",
             f"{cli_output.seconds(c.duration_ms_a) or '-'} -> {cli_output.seconds(c.duration_ms_b) or '-'}",
             "" if c.ratio is None else f"x{c.ratio:.2f}", _changed(c.output_changed), _changed(c.params_changed),
             "/".join(side for side, reused in (("A", c.reused_a), ("B", c.reused_b)) if reused)]
            for c in found.changes]
    click.echo(formats.table(["role", "status", "duration", "ratio", "output", "params", "reused"], rows))
    for batch_id, only in ((found.batch_a, found.only_a), (found.batch_b, found.only_b)):
        if only:
            click.echo(f"only in {batch_id}: {', '.join(only)}")
    click.echo(found.summary())


def _changed(value: bool | None) -> str:
    return "-" if value is None else "changed" if value else "same"
