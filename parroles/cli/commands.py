"""The ``parroles`` command: a thin layer over the Python API.

Errors become exit codes in one place, ``ParrolesGroup.invoke``.
"""

from __future__ import annotations

import contextlib
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

from parroles import signals
from parroles.config import DEFAULT_LEDGER, LEDGER_ENV, run_options
from parroles.errors import ParrolesError, SpecError

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


RUNNING_COMMANDS = ("run", "resume")  # commands that run a batch: a signal ends it cleanly (parroles.signals)


class ParrolesGroup(click.Group):
    """Turns parroles errors into one-line messages and their exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            if ctx.invoked_subcommand not in RUNNING_COMMANDS:
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


_OPTION_TYPES: dict[str, Any] = {"int": int, "int | None": int, "float": float, "float | None": float,
                                 "str": str, "str | None": str, "int | str | None": str}


def config_options(command: Callable[..., Any], leave_out: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The options of ``parroles run`` that override the spec's config: one per field that has one, with the
    field's own help (``config.run_options``); each arrives as the field's name, None when not given."""
    for declaration, field in reversed(run_options()):
        if field.name in leave_out:
            continue
        choices = field.metadata["choices"]
        kind = click.Choice(choices) if choices else _OPTION_TYPES.get(str(field.type))
        flag, said = "/" in declaration, field.metadata["help"]
        command = click.option(declaration, field.name, type=None if flag else kind, default=None,
                               help=f"{said[:1].upper()}{said[1:]} (overrides the spec).")(command)
    return command


@cli.command(epilog=EXIT_CODES)
@click.argument("spec", type=click.Path(dir_okay=False))
@ledger_option
@config_options
@json_option
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary.")
@click.option("--verbose", "-v", is_flag=True, help="Show what roles print, live, as 'role | line'.")
def run(spec: str, ledger_path: str, as_json: bool, quiet: bool, verbose: bool, **overrides: Any) -> None:
    """Run the roles of a SPEC file (TOML) and record them in the ledger (what roles print: parroles logs)."""
    with signals.deferred():  # from here on, Ctrl-C cancels the batch cleanly (see parroles.signals)
        run_spec(spec, ledger_path, overrides, as_json, quiet, verbose)


def run_spec(spec: str, ledger_path: str, overrides: dict[str, Any], as_json: bool, quiet: bool, verbose: bool,
             resumed_from: str | None = None) -> None:
    """Run a spec file's batch, show it, and exit 0 if every role completed, else 1 (``run`` and ``resume``)."""
    from parroles import spec as specs
    from parroles.runner import workers

    loaded = specs.load_spec(spec)
    config = loaded.config(**overrides)
    # They boot while the rest of the command loads and the ledger opens; with reuse, once a role is to run.
    if loaded.roles and config.reuse is False:
        workers.start_workers(config.workers_for(len(loaded.roles)), config)
    from parroles import errors
    from parroles.cli import output as cli_output
    from parroles.runner import execute as executor
    from parroles.runner.begin import Origin

    batch_id = f"{loaded.name}-{uuid.uuid4().hex[:12]}"
    roles = loaded.pipeline()
    view = cli_output.ProgressView([r.name for r in loaded.roles], quiet=quiet or as_json,
                                   needs=[r.needs for r in loaded.roles], slots=config.workers_for(len(roles)),
                                   expected_ms=cli_output.expected_for(ledger_path, roles, quiet or as_json))
    interrupted: BaseException | None = None
    with warnings_on_stderr(), view:
        try:
            results = executor.execute_roles_parallel(
                ledger_path, batch_id, roles, loaded.digest, config,
                name=loaded.name, sys_path=[str(loaded.path.parent.resolve())],
                on_update=view.update, on_output=view.output if verbose else None,
                origin=Origin(str(loaded.path.resolve()), resumed_from))
        except errors.ParallelExecutionFailed as exc:
            results = exc.results
        except (KeyboardInterrupt, errors.BatchInterrupted) as exc:
            # Every run of the batch was ended (and reported to the view) before this reached us.
            interrupted, results = exc, [r for r in view.results if r is not None]
    if interrupted is not None:
        if results:  # the batch was recorded: show how it ended, as for any other ending
            cli_output.echo(cli_output.summary(results, config.workers_for(len(results))))
            cli_output.echo(f"batch {batch_id} in {ledger_path}")
        raise interrupted
    if as_json:
        cli_output.echo_json({"batch_id": batch_id, "ledger": ledger_path, "results": results})
    else:
        cli_output.echo(cli_output.summary(results, config.workers_for(len(results))))
        cli_output.echo(f"batch {batch_id} in {ledger_path}")
    click.get_current_context().exit(0 if all(r.success for r in results) else 1)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
@ledger_option
def graph(spec: str, fmt: str, ledger_path: str) -> None:
    """Print the roles of a SPEC file and what each needs, as a Mermaid or Graphviz graph (--ledger: unused)."""
    from parroles import spec as specs
    from parroles.cli import output as cli_output

    loaded = specs.load_spec(spec)  # a bad spec: its problems and exit 2, as for run
    names = [role.name for role in loaded.roles]
    render = cli_output.mermaid if fmt == "mermaid" else cli_output.dot
    click.echo(render(names, loaded.edges()))


@contextlib.contextmanager
def warnings_on_stderr() -> Iterator[None]:
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


def main() -> None:
    cli(prog_name="parroles")
