"""The ``parroles`` command: ``commands`` (the group, run, graph) and ``reading`` (the read commands), a few
lines each over the library; ``output`` and ``formats`` (how it shows things)."""

from parroles.cli import reading  # noqa: F401 - registers the read commands on cli
from parroles.cli.commands import cli, main

__all__ = ["cli", "main"]
