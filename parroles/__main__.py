"""The ``parroles`` command's entry point (``python -m parroles`` too).

SIGINT and SIGTERM are deferred from the first line on (``parroles.signals``),
before anything heavy is imported: ``parroles run`` keeps the deferral, so a
signal at any moment ends the batch cleanly; other commands end it as they
start, so Ctrl-C stops them as usual.
"""

from __future__ import annotations


def main() -> None:
    from parroles import signals

    with signals.deferred():
        from parroles.cli import main as cli_main

        cli_main()


if __name__ == "__main__":
    main()
