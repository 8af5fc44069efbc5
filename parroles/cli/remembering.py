"""The commands that use what the ledger remembers: ``resume`` (run a batch's spec again, reusing what
completed) and ``why`` (what a run's cache key is made of, and what changed). A few lines each over the library."""

from __future__ import annotations

import json
from typing import Any

import click

from parroles import signals
from parroles.cli.commands import EXIT_CODES, cli, config_options, json_option, ledger_option, run_spec


@cli.command(epilog=EXIT_CODES)
@click.argument("batch")
@ledger_option
@click.option("--reuse-any", is_flag=True,
              help="Reuse completed runs of any batch of the ledger, not only of BATCH.")
@(lambda command: config_options(command, leave_out=("reuse",)))
@json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@click.option("--verbose", "-v", is_flag=True, help="Show what roles print, live, as 'role | line'.")
def resume(batch: str, ledger_path: str, reuse_any: bool, as_json: bool, quiet: bool, verbose: bool,
           **overrides: Any) -> None:
    """Run BATCH's spec file again as a new batch: the roles it completed are reused (unless their cache key
    changed), the others run, and so does what needs an output that changed."""
    from parroles.cli.reading import reader
    from parroles.spec.resume import resumable

    with signals.deferred():
        with reader(ledger_path) as ledger:
            found = resumable(ledger, batch)
        if found.changed:
            click.echo(f"parroles: note: {found.spec_path} changed since batch {found.batch_id} ran; "
                       "running it as it is now", err=True)
        overrides["reuse"] = True if reuse_any else found.batch_id
        run_spec(found.spec_path, ledger_path, overrides, as_json, quiet, verbose, resumed_from=found.batch_id)


@cli.command()
@click.argument("run_id")
@ledger_option
@click.option("--against", help="Compare with this run (default: the most recent earlier run of the same role).")
@json_option
def why(run_id: str, ledger_path: str, against: str | None, as_json: bool) -> None:
    """Why RUN_ID ran or was reused: its cache key's parts, and which differ from another run of its role."""
    from parroles.cli import output as cli_output
    from parroles.cli.reading import reader
    from parroles.ledger.why import explain

    with reader(ledger_path) as ledger:
        found = explain(ledger, run_id, against)
    run = found.run
    if as_json:
        return cli_output.echo_json({
            "run_id": run.run_id, "role": str(run.role), "batch_id": run.parent_run_id, "status": run.status.value,
            "cache_key": run.cache_key, "parts": run.cache_parts, "reused_from": run.reused_from,
            "against": found.against.run_id if found.against else None, "differences": found.differences})
    click.echo(f"run {run.run_id} ({run.role}, batch {run.parent_run_id}): {run.status.value}"
               + (f", reused from run {run.reused_from}" + (f" (batch {found.source.parent_run_id})"
                                                              if found.source else "") if run.reused_from else ""))
    if run.cache_parts is None:
        click.echo("no cache key recorded: it never was about to start, or a parroles before keys ran it")
        return
    click.echo(f"key: {run.cache_key or 'none: ' + str(run.cache_parts.get('not_reusable'))}")
    for name, part in (run.cache_parts or {}).items():
        if name != "not_reusable":
            click.echo(f"  {name:<7} {part if isinstance(part, str) else json.dumps(part, ensure_ascii=False)}")
    if found.against is None:
        click.echo("no earlier run of this role has a key to compare with")
        return
    click.echo(f"against run {found.against.run_id} (batch {found.against.parent_run_id}):")
    if not found.differences:
        click.echo("  same key: nothing differs" if found.same_key else "  nothing differs")
        if found.same_key and found.against.status.value != "COMPLETED" and run.reused_from is None:
            click.echo(f"  (that run ended {found.against.status.value}: it had no output to reuse)")
    for line in found.differences:
        click.echo(f"  - {line}")
