"""The ``parroles`` command: ``commands`` (the group, run, graph), ``reading`` (the read commands) and
``remembering`` (resume, why), a few lines each over the library; ``output`` and ``formats`` (how it shows
things)."""

from parroles.cli import looking, reading, remembering  # noqa: F401 - registers their commands on cli
from parroles.cli.commands import cli, main

__all__ = ["cli", "main"]
