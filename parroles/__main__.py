"""The ``parroles`` command's entry point (``python -m parroles`` too).

SIGINT and SIGTERM are deferred from the first line on (``parroles.signals``),
before anything heavy is imported: ``parroles run`` keeps the deferral, so a
signal at any moment ends the batch cleanly; other commands end it as they
start, so Ctrl-C stops them as usual.
"""

from __future__ import annotations

import gc


def main() -> None:
    from parroles import signals

    try:
        with signals.deferred():
            from parroles.cli import main as cli_main

            cli_main()
    finally:
        # The command is over (click ends every one with SystemExit) and the process with it. Its heap needs
        # no collecting: frozen, the interpreter's last collections skip it, ~30 ms off every command's exit.
        # Nothing is lost: the ledger is closed and journaled by then, and output flushed at exit as always.
        gc.freeze()


if __name__ == "__main__":
    main()
