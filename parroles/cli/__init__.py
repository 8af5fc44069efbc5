"""The ``parroles`` command: ``commands`` (a few lines each over the library) and ``output`` (how it shows things)."""

from parroles.cli.commands import cli, main

__all__ = ["cli", "main"]
