"""``python -m parroles`` works like ``parroles``."""

from parroles.cli import main

main()
